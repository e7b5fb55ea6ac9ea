from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from core import access
from core.exceptions import LifeboatError
from core.portal import current_vault, filtered, render_page, require, visible_or_404
from core.tables import Sorting, ranked, table_page
from replication.choices import ProtectionState
from vault import roles, selectors, services
from vault.discovery import vcenter_discover
from vault.choices import Severity
from vault.filters import AlertFilter, EventFilter, MachineFilter
from vault.forms import PolicyForm, RecoverySiteForm, RoleAssignmentForm, VaultForm, VCenterForm
from vault.models import Alert, ReplicationPolicy, RoleAssignment, VCenter
from vault.roles import ROLE_TABLE


def _require_superuser(request) -> None:
    if not request.user.is_superuser:
        raise PermissionDenied("Only an administrator (a superuser) creates vaults; ask one to create it and give "
                               "you a role on it.")


def _vault_or_setup(request):
    vault = current_vault(request)
    if vault is None:
        return None, redirect("portal:vault-create")
    return vault, None


@login_required
def overview(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    context = {"vault": vault, **selectors.vault_overview(vault=vault)}
    # Show each protection state by its label ("Initial replication in progress").
    context["by_state"] = [(state, ProtectionState(state).label, n) for state, n in context["by_state"]]
    return render_page(request, "vault/overview.html", context, partial="live")


@login_required
def vault_create(request):
    _require_superuser(request)
    form = VaultForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        vault = form.save()
        if vault is not None:
            request.session["vault_id"] = vault.pk
            messages.success(request, f"Vault {vault.name} created.")
            return redirect("portal:overview")
    return render(request, "vault/vault_form.html", {"form": form, "vault": current_vault(request), "creating": True})


@login_required
def vault_settings(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    form = VaultForm(request.POST or None, instance=vault)
    if request.method == "POST":
        require(request, vault.pk, access.MANAGE)
        if form.is_valid() and form.save() is not None:
            messages.success(request, "Vault settings saved.")
            return redirect("portal:vault-settings")
    return render(request, "vault/vault_form.html", {"form": form, "vault": vault, "creating": False,
                                                     **_access_context(request, vault)})


def _access_context(request, vault) -> dict:
    """The vault's role assignments, for its owners only."""
    if not access.can(request.user, vault.pk, access.ACCESS):
        return {}
    return {"assignments": vault.role_assignments.select_related("user", "group").order_by("role", "id"),
            "role_form": RoleAssignmentForm(), "roles_table": ROLE_TABLE}


@login_required
@require_POST
def role_add(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    require(request, vault.pk, access.ACCESS)
    form = RoleAssignmentForm(request.POST)
    if form.is_valid():
        done = form.save_with(_assign, vault=vault, by=request.user, **form.cleaned_data)
        if done is not None:
            messages.success(request, f"{done.user.get_username() if done.user_id else 'Group ' + done.group.name} "
                                      f"is {done.get_role_display()} of {vault.name}.")
            return redirect("portal:vault-settings")
    for field, errors in form.errors.items():
        for error in errors:
            messages.error(request, error)
    return redirect("portal:vault-settings")


def _assign(*, vault, by, who: str, kind: str, role: str):
    if kind == "group":
        return roles.role_assign(vault=vault, role=role, group=roles.find_group(who), by=by)
    return roles.role_assign(vault=vault, role=role, user=roles.find_user(who), by=by)


@login_required
@require_POST
def role_remove(request, pk):
    assignment = visible_or_404(RoleAssignment.objects.select_related("vault", "user", "group"), request, pk=pk)
    require(request, assignment.vault_id, access.ACCESS)
    try:
        roles.role_remove(assignment=assignment)
        messages.success(request, f"Removed: {assignment}.")
    except LifeboatError as exc:
        messages.error(request, exc.message)
    return redirect("portal:vault-settings")


INFRA_MACHINES = 20


@login_required
def infrastructure(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    vcenters = vault.vcenters.annotate(
        machine_count=Count("machines", filter=Q(machines__missing=False), distinct=True)
    )
    form = VCenterForm(initial={"port": 443})
    context = {
        "vault": vault,
        "configuration_servers": vault.configuration_servers.all(),
        "process_servers": vault.process_servers.all(),
        "master_target_servers": vault.master_target_servers.all(),
        "vcenters": vcenters,
        # The first few; every machine is on the machines page (paginated, sorted, filtered).
        "machines": vault.machines.filter(missing=False).select_related("vcenter").prefetch_related("disks")[:INFRA_MACHINES],
        "machine_count": vault.machines.filter(missing=False).count(),
        "vcenter_form": form,
        "recovery_sites": vault.recovery_sites.prefetch_related("networks"),
    }
    return render(request, "vault/infrastructure.html", context)


@login_required
@require_POST
def vcenter_add(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    require(request, vault.pk, access.MANAGE)
    form = VCenterForm(request.POST)
    if form.is_valid() and form.save(vault=vault) is not None:
        messages.success(request, f"{form.cleaned_data['name']} added. Run discovery to list its machines.")
        return redirect("portal:infrastructure")
    for field, errors in form.errors.items():
        for error in errors:
            messages.error(request, f"{field}: {error}" if field != "__all__" else error)
    return redirect("portal:infrastructure")


@login_required
def recovery_site_list(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    sites = vault.recovery_sites.prefetch_related("networks").annotate(item_count=Count("protected_items", distinct=True))
    form = RecoverySiteForm(initial={"port": 443})
    return render(request, "vault/recovery_sites.html", {"vault": vault, "sites": sites, "form": form})


@login_required
@require_POST
def recovery_site_add(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    require(request, vault.pk, access.MANAGE)
    form = RecoverySiteForm(request.POST)
    if form.is_valid():
        site = form.save(vault=vault)
        if site is not None:
            messages.success(request, f"Recovery site {site.name} added. Map items to it on their pages.")
            return redirect("portal:recovery-sites")
    sites = vault.recovery_sites.prefetch_related("networks").annotate(item_count=Count("protected_items", distinct=True))
    return render(request, "vault/recovery_sites.html", {"vault": vault, "sites": sites, "form": form, "form_open": True})


@login_required
@require_POST
def vcenter_discover_view(request, pk):
    vcenter = visible_or_404(VCenter.objects.all(), request, pk=pk)
    require(request, vcenter.vault_id, access.OPERATE)
    try:
        job = vcenter_discover(vcenter=vcenter, user=request.user)
    except LifeboatError as exc:
        messages.error(request, exc.message)
        return redirect("portal:infrastructure")
    messages.info(request, f"Discovery of {vcenter.name} started.")
    return redirect("portal:job-detail", pk=job.pk)


@login_required
def policy_list(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    policies = vault.policies.annotate(item_count=Count("protected_items")).order_by("is_failback", "name")
    return render(request, "vault/policy_list.html", {"vault": vault, "policies": policies})


@login_required
def policy_edit(request, pk=None):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    policy = get_object_or_404(ReplicationPolicy, pk=pk, vault=vault, is_failback=False) if pk else None
    form = PolicyForm(request.POST or None, instance=policy, vault=vault)
    if request.method == "POST":
        require(request, vault.pk, access.MANAGE)
        if form.is_valid():
            saved = form.save()
            if saved is not None:
                messages.success(request, f"Policy {saved.name} saved; its failback policy follows it.")
                return redirect("portal:policies")
    return render(request, "vault/policy_form.html", {"vault": vault, "form": form, "policy": policy})


ALERT_SORTING = Sorting(columns={
    "raised_at": ("raised_at",), "severity": (ranked("severity", Severity.values),), "kind": ("kind",),
    "state": ("state",), "acknowledged": ("acknowledged",),
}, default="-raised_at")


@login_required
def alert_list(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    params = request.GET.copy()
    params.setdefault("state", "ACTIVE")
    filterset = AlertFilter(params, queryset=Alert.objects.filter(vault=vault).select_related("protected_item", "process_server", "job"))
    page, ordering = table_page(request, filtered(request, filterset), sorting=ALERT_SORTING, per_page=50)
    events = vault.events.select_related("protected_item")[:30]
    return render(request, "vault/alert_list.html", {"vault": vault, "filter": filterset, "page": page, "events": events,
                                                     "ordering": ordering})


EVENT_SORTING = Sorting(columns={
    "created_at": ("created_at",), "severity": (ranked("severity", Severity.values),), "kind": ("kind",),
}, default="-created_at")


@login_required
def event_list(request):
    """Every event of the vault, newest first: filtered, sorted and paginated."""
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    filterset = EventFilter(request.GET, queryset=vault.events.select_related("protected_item"))
    page, ordering = table_page(request, filtered(request, filterset), sorting=EVENT_SORTING, per_page=50)
    return render(request, "vault/event_list.html", {"vault": vault, "filter": filterset, "page": page, "ordering": ordering})


MACHINE_SORTING = Sorting(columns={
    "name": ("name",), "source": ("vcenter__name", "source"), "power_state": ("power_state",), "guest_os": ("guest_os",),
    "host": ("host",), "last_seen_at": ("last_seen_at",),
}, default="name")


@login_required
def machine_list(request):
    """The vault's discovered and registered machines: filtered, sorted and paginated."""
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    filterset = MachineFilter(request.GET, queryset=vault.machines.select_related("vcenter").prefetch_related(
        "disks", "protected_items"))
    page, ordering = table_page(request, filtered(request, filterset), sorting=MACHINE_SORTING, per_page=100)
    return render(request, "vault/machine_list.html", {"vault": vault, "filter": filterset, "page": page,
                                                       "ordering": ordering, "vcenters": vault.vcenters.all()})


@login_required
@require_POST
def alert_acknowledge_view(request, pk):
    alert = visible_or_404(Alert.objects.all(), request, pk=pk)
    require(request, alert.vault_id, access.OPERATE)
    services.alert_acknowledge(alert=alert, user=request.user)
    if request.htmx:
        return render(request, "vault/alert_list.html#alert-row", {"alert": alert})
    return redirect("portal:alerts")
