from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from core.exceptions import LifeboatError
from core import access
from core.portal import current_vault, filtered, render_page, require, visible_or_404
from core.tables import Sorting, ranked, table_page
from replication import agents, services
from replication.choices import ProtectionState, TestFailoverState
from replication.data_path import item_data_path
from replication.filters import ProtectedItemFilter
from replication.forms import EnableReplicationForm, NetworkMappingForm
from replication.choices import Direction
from replication.models import AgentRegistration, ProtectedItem
from replication.selectors import item_actions, item_rpo_history
from vault.choices import Health
from vault.forms import WorkloadForm
from vault.simulation import machine_set_workload, machine_workload


def recovery_operations(*, item: ProtectedItem) -> list[tuple[str, str]]:
    """(operation, button label) of the recovery operations the item's state allows now."""
    operations = []
    if item.direction == Direction.RECOVERY_TO_PRIMARY:
        return operations  # a returning replication fails over from its failback (failback app)
    if item.protection_state in ProtectionState.TEST_FAILOVER_ALLOWED and item.test_failover_state == TestFailoverState.NONE:
        operations.append(("test-failover", "Test failover"))
    if item.test_failover_state == TestFailoverState.SUCCEEDED:
        operations.append(("test-failover-cleanup", "Cleanup test failover"))
    if item.protection_state == ProtectionState.PROTECTED:
        operations.append(("failover", "Failover"))
    if item.protection_state == ProtectionState.FAILED_OVER:
        operations.append(("apply-recovery-point", "Change recovery point"))
        operations.append(("commit", "Commit"))
    return operations


def recovered_vms(*, item: ProtectedItem) -> list:
    """The item's current test VM and failover VM (those not removed), test VM first."""
    return sorted(
        item.recovered_vms.filter(removed_at__isnull=True).select_related("site", "network"),
        key=lambda vm: (vm.kind != "TEST", vm.created_at),
    )


ITEM_SORTING = Sorting(columns={
    "name": ("name",), "direction": ("direction",), "protection_state": ("protection_state",), "health": (ranked("health", Health.values),),
    "rpo_seconds": ("rpo_seconds",), "test_failover_state": ("test_failover_state",), "policy": ("policy__name",),
    "process_server": ("process_server__name",),
}, default="name")


@login_required
def item_list(request):
    vault = current_vault(request)
    if vault is None:
        return redirect("portal:vault-create")
    qs = ProtectedItem.objects.filter(vault=vault).select_related("policy", "process_server", "machine")
    filterset = ProtectedItemFilter(request.GET, queryset=qs)
    page, ordering = table_page(request, filtered(request, filterset), sorting=ITEM_SORTING, per_page=100)
    return render_page(request, "replication/item_list.html",
                       {"vault": vault, "filter": filterset, "page": page, "ordering": ordering}, partial="rows")


@login_required
def item_detail(request, pk):
    item = visible_or_404(
        ProtectedItem.objects.select_related(
            "vault", "policy", "process_server", "machine", "recovery_site", "recovery_network", "test_network"
        ), request, pk=pk,
    )
    points = list(item.recovery_points.order_by("-time")[:50])
    context = {
        "vault": item.vault,
        "can": access.capabilities(request.user, item.vault_id),  # the item's vault, whichever the portal shows
        "item": item,
        "disks": item.replica_disks.all(),
        "points": points,
        "events": item.events.order_by("-created_at")[:20],
        "actions": item_actions(item=item),
        "recovery_operations": recovery_operations(item=item),
        "recovered_vms": recovered_vms(item=item),
        "pending_apply": max(0, item.acked_seq - item.applied_seq),
        "data_path": item_data_path(item=item),
    }
    if not (request.htmx and not request.htmx.boosted):
        if item.vault.recovery_sites.exists():
            context["mapping_form"] = NetworkMappingForm(item=item)
        context["rpo_history"] = item_rpo_history(item=item)
        workload = machine_workload(machine=item.machine)
        context["workload_form"] = WorkloadForm(initial=workload) if workload is not None else None
    return render_page(request, "replication/item_detail.html", context, partial="status")


# --- operations ----------------------------------------------------------------------------


@login_required
def enable_replication(request):
    vault = current_vault(request)
    if vault is None:
        return redirect("portal:vault-create")
    data = request.POST if request.method == "POST" else (request.GET if "source" in request.GET else None)
    form = EnableReplicationForm(data, vault=vault)
    if request.method == "POST":
        require(request, vault.pk, access.OPERATE)
        if form.is_valid():
            started, failed = [], []
            for machine in form.cleaned_data["machines"]:
                try:
                    with transaction.atomic():
                        _, job = services.protected_item_enable(
                            vault=vault, machine=machine, policy=form.cleaned_data["policy"],
                            process_server=form.cleaned_data["process_server"], user=request.user,
                        )
                    started.append(machine.name)
                except LifeboatError as exc:
                    failed.append(f"{machine.name}: {exc.message}")
            if started:
                messages.success(request, f"Enabling replication of {', '.join(started)} (one job each).")
            for f in failed:
                messages.error(request, f)
            return redirect("portal:items")
    elif request.htmx and data is not None:
        return render(request, "replication/enable.html#machines", {"form": form, "vault": vault})
    return render(request, "replication/enable.html", {"form": form, "vault": vault, "storage": settings.LIFEBOAT_STORAGE})


@login_required
@require_POST
def item_action(request, pk, action):
    item = visible_or_404(ProtectedItem.objects.all(), request, pk=pk)
    require(request, item.vault_id, access.OPERATE)
    operations = {
        "resync": services.protected_item_resync,
        "disable": services.protected_item_disable,
        "retry": services.protected_item_enable_retry,
    }
    if action not in operations:
        raise PermissionDenied("Unknown operation.")
    try:
        _, job = operations[action](item=item, user=request.user)
    except LifeboatError as exc:
        messages.error(request, exc.message)
        return redirect("portal:item-detail", pk=pk)
    return redirect("portal:job-detail", pk=job.pk)


@login_required
@require_POST
def workload_update(request, pk):
    """Change a simulated VM's write rate (the demo's churn control)."""
    item = visible_or_404(ProtectedItem.objects.select_related("machine", "machine__vcenter"), request, pk=pk)
    require(request, item.vault_id, access.OPERATE)
    form = WorkloadForm(request.POST)
    if form.is_valid():
        try:
            machine_set_workload(machine=item.machine, **form.cleaned_data)
            messages.success(request, "Simulated workload changed.")
        except LifeboatError as exc:
            messages.error(request, exc.message)
    else:
        for field, errors in form.errors.items():
            messages.error(request, f"{field}: {'; '.join(errors)}")
    return redirect("portal:item-detail", pk=pk)


@login_required
@require_POST
def network_mapping_update(request, pk):
    """Change where the item's recovered VMs go: recovery site, recovery and test network."""
    item = visible_or_404(ProtectedItem.objects.select_related("vault"), request, pk=pk)
    require(request, item.vault_id, access.OPERATE)
    form = NetworkMappingForm(request.POST, item=item)
    if form.is_valid() and form.save() is not None:
        messages.success(request, "Network mapping saved.")
    else:
        for field, errors in form.errors.items():
            for error in errors:
                messages.error(request, error if field == "__all__" else f"{form.fields[field].label}: {error}")
    return redirect("portal:item-detail", pk=pk)


@login_required
@require_POST
def agent_registration_decide(request, pk, decision):
    """Approve or reject an agent registration that waits for an administrator (the
    infrastructure page's buttons)."""
    registration = visible_or_404(AgentRegistration.objects.select_related("machine"), request, pk=pk)
    require(request, registration.vault_id, access.MANAGE)
    decide = {"approve": agents.agent_registration_approve, "reject": agents.agent_registration_reject}.get(decision)
    if decide is None:
        raise PermissionDenied("Unknown decision.")
    try:
        decide(registration_id=registration.pk, user=request.user)
    except LifeboatError as exc:
        messages.error(request, exc.message)
    else:
        if decision == "approve":
            messages.success(request, f"{registration.hostname} is now the agent of {registration.machine.name}; the "
                                      "previous agent's tokens no longer work.")
        else:
            messages.success(request, f"The registration of {registration.hostname} as {registration.machine.name} "
                                      "was rejected.")
    return redirect("portal:infrastructure")
