from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from core.exceptions import LifeboatError
from core.portal import current_vault, filtered, render_page
from replication.choices import ProtectionState
from vault import selectors, services
from vault.discovery import vcenter_discover
from vault.filters import AlertFilter
from vault.forms import PolicyForm, RecoverySiteForm, VaultForm, VCenterForm
from vault.models import Alert, ReplicationPolicy, VCenter


def _require_admin(request) -> None:
    if not request.user.is_staff:
        raise PermissionDenied("Only administrators can change the vault.")


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
    _require_admin(request)
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
        _require_admin(request)
        if form.is_valid() and form.save() is not None:
            messages.success(request, "Vault settings saved.")
            return redirect("portal:vault-settings")
    return render(request, "vault/vault_form.html", {"form": form, "vault": vault, "creating": False})


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
        "machines": vault.machines.filter(missing=False).select_related("vcenter").prefetch_related("disks")[:200],
        "vcenter_form": form,
        "recovery_sites": vault.recovery_sites.prefetch_related("networks"),
    }
    return render(request, "vault/infrastructure.html", context)


@login_required
@require_POST
def vcenter_add(request):
    _require_admin(request)
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
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
    _require_admin(request)
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
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
    _require_admin(request)
    vcenter = get_object_or_404(VCenter, pk=pk)
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
        _require_admin(request)
        if form.is_valid():
            saved = form.save()
            if saved is not None:
                messages.success(request, f"Policy {saved.name} saved; its failback policy follows it.")
                return redirect("portal:policies")
    return render(request, "vault/policy_form.html", {"vault": vault, "form": form, "policy": policy})


@login_required
def alert_list(request):
    vault, setup = _vault_or_setup(request)
    if setup:
        return setup
    params = request.GET.copy()
    params.setdefault("state", "ACTIVE")
    filterset = AlertFilter(params, queryset=Alert.objects.filter(vault=vault).select_related("protected_item", "process_server", "job"))
    page = Paginator(filtered(request, filterset), 50).get_page(request.GET.get("page"))
    events = vault.events.select_related("protected_item")[:30]
    return render(request, "vault/alert_list.html", {"vault": vault, "filter": filterset, "page": page, "events": events})


@login_required
@require_POST
def alert_acknowledge_view(request, pk):
    _require_admin(request)
    alert = get_object_or_404(Alert, pk=pk)
    services.alert_acknowledge(alert=alert, user=request.user)
    if request.htmx:
        return render(request, "vault/alert_list.html#alert-row", {"alert": alert})
    return redirect("portal:alerts")
