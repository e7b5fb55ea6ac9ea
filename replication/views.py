from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from core.exceptions import LifeboatError
from core.portal import current_vault, filtered, render_page
from replication import services
from replication.choices import ProtectionState, TestFailoverState
from replication.filters import ProtectedItemFilter
from replication.forms import EnableReplicationForm, NetworkMappingForm
from replication.choices import Direction
from replication.models import ProtectedItem
from replication.selectors import item_actions, item_rpo_history
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


@login_required
def item_list(request):
    vault = current_vault(request)
    if vault is None:
        return redirect("portal:vault-create")
    qs = ProtectedItem.objects.filter(vault=vault).select_related("policy", "process_server", "machine")
    filterset = ProtectedItemFilter(request.GET, queryset=qs)
    page = Paginator(filtered(request, filterset), 100).get_page(request.GET.get("page"))
    return render_page(request, "replication/item_list.html", {"vault": vault, "filter": filterset, "page": page}, partial="rows")


@login_required
def item_detail(request, pk):
    item = get_object_or_404(
        ProtectedItem.objects.select_related(
            "vault", "policy", "process_server", "machine", "recovery_site", "recovery_network", "test_network"
        ), pk=pk,
    )
    points = list(item.recovery_points.order_by("-time")[:50])
    context = {
        "vault": item.vault,
        "item": item,
        "disks": item.replica_disks.all(),
        "points": points,
        "events": item.events.order_by("-created_at")[:20],
        "actions": item_actions(item=item),
        "recovery_operations": recovery_operations(item=item),
        "recovered_vms": recovered_vms(item=item),
        "pending_apply": max(0, item.acked_seq - item.applied_seq),
    }
    if not (request.htmx and not request.htmx.boosted):
        if item.vault.recovery_sites.exists():
            context["mapping_form"] = NetworkMappingForm(item=item)
        context["rpo_history"] = item_rpo_history(item=item)
        workload = machine_workload(machine=item.machine)
        context["workload_form"] = WorkloadForm(initial=workload) if workload is not None else None
    return render_page(request, "replication/item_detail.html", context, partial="status")


# --- operations ----------------------------------------------------------------------------


def _require_admin(request) -> None:
    if not request.user.is_staff:
        raise PermissionDenied("Only administrators can change replication.")


@login_required
def enable_replication(request):
    vault = current_vault(request)
    if vault is None:
        return redirect("portal:vault-create")
    data = request.POST if request.method == "POST" else (request.GET if "source" in request.GET else None)
    form = EnableReplicationForm(data, vault=vault)
    if request.method == "POST":
        _require_admin(request)
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
    _require_admin(request)
    item = get_object_or_404(ProtectedItem, pk=pk)
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
    _require_admin(request)
    item = get_object_or_404(ProtectedItem.objects.select_related("machine", "machine__vcenter"), pk=pk)
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
    _require_admin(request)
    item = get_object_or_404(ProtectedItem.objects.select_related("vault"), pk=pk)
    form = NetworkMappingForm(request.POST, item=item)
    if form.is_valid() and form.save() is not None:
        messages.success(request, "Network mapping saved.")
    else:
        for field, errors in form.errors.items():
            for error in errors:
                messages.error(request, error if field == "__all__" else f"{form.fields[field].label}: {error}")
    return redirect("portal:item-detail", pk=pk)
