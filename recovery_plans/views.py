from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Prefetch
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render

from core.portal import current_vault
from recovery_plans import forms as recovery_forms
from recovery_plans.models import RecoveryPlanGroup
from replication.models import ProtectedItem
from replication.views import recovery_operations


@login_required
def plan_list(request):
    vault = current_vault(request)
    if vault is None:
        return redirect("portal:vault-create")
    plans = vault.recovery_plans.prefetch_related(
        Prefetch("groups", queryset=RecoveryPlanGroup.objects.annotate(item_count=Count("items")))
    )
    return render(request, "recovery_plans/plan_list.html", {"vault": vault, "plans": plans})


# --- recovery of one item ------------------------------------------------------------------

# operation (in the URL) -> (form, page title, submit button, intro)
OPERATIONS = {
    "test-failover": (
        recovery_forms.TestFailoverForm, "Test failover", "Start test failover",
        "Brings a copy of the VM up from a recovery point in an isolated test network, under a name that "
        "cannot collide with production. Replication goes on untouched. Every disk is checked against the "
        "replica before the VM is reported running.",
    ),
    "test-failover-cleanup": (
        recovery_forms.TestFailoverCleanupForm, "Cleanup test failover", "Clean up",
        "Deletes the test VM and its disks at the recovery site and records your notes with the drill.",
    ),
    "failover": (
        recovery_forms.FailoverForm, "Failover", "Fail over",
        "Brings the VM up at the recovery site from a recovery point, on the recovery network, and checks "
        "every disk against the replica. Until you commit, you can change the recovery point.",
    ),
    "apply-recovery-point": (
        recovery_forms.ApplyRecoveryPointForm, "Change recovery point", "Change recovery point",
        "Powers the failed-over VM off, replaces its disks with another recovery point's (checked against the "
        "replica), and powers it on again.",
    ),
    "commit": (
        recovery_forms.FailoverCommitForm, "Commit failover", "Commit",
        "Makes the failover final: the recovery point can no longer be changed and the recovery points no "
        "longer needed are released.",
    ),
}


@login_required
def item_recovery(request, pk, operation):
    """One recovery operation's short form; a valid submit starts the job and shows it."""
    if operation not in OPERATIONS:
        raise Http404("No such recovery operation.")
    form_class, title, submit_label, intro = OPERATIONS[operation]
    item = get_object_or_404(
        ProtectedItem.objects.select_related(
            "vault", "machine", "recovery_site", "recovery_network", "test_network"
        ), pk=pk,
    )
    if not request.user.is_staff:
        raise PermissionDenied("Only administrators can recover VMs.")
    status = 200
    if request.method == "POST":
        form = form_class(request.POST, item=item)
        if form.is_valid():
            job = form.submit(user=request.user)
            if job is not None:
                messages.success(request, f"{title} of {item.name} started.")
                return redirect("portal:job-detail", pk=job.pk)
            if form.conflict:
                status = 409
    else:
        if operation not in {op for op, _label in recovery_operations(item=item)}:
            messages.error(
                request,
                f"{title} is not possible now: {item.name} is {item.get_protection_state_display().lower()}, "
                f"test failover: {item.get_test_failover_state_display().lower()}.",
            )
            return redirect("portal:item-detail", pk=item.pk)
        form = form_class(item=item)
    context = {"vault": item.vault, "item": item, "form": form, "title": title, "submit_label": submit_label,
               "intro": intro, "operation": operation}
    return render(request, "recovery_plans/item_recovery.html", context, status=status)
