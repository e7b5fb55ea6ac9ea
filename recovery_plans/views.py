from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from core import access
from core.portal import current_vault, render_page, require, visible_or_404
from recovery_plans import forms as recovery_forms
from recovery_plans import services
from recovery_plans.models import ActionKind, ActionPhase, RecoveryPlan
from recovery_plans.run_views import plan_run_context
from replication.models import ProtectedItem
from replication.views import recovery_operations


def _require_manage(request, vault_id) -> None:
    require(request, vault_id, access.MANAGE)


def _plan_context(request, plan, *, error: str = "") -> dict:
    status = services.recovery_plan_status(plan=plan)
    placed = {r.item.pk for r in status.items}
    sites = {r.item.recovery_site_id: r.item.recovery_site for r in status.items if r.item.recovery_site_id}
    sites.update({m.site_id: m.site for m in plan.network_mappings.all()})
    sites = sorted(sites.values(), key=lambda s: s.name)
    groups = [(g, [r for r in status.items if r.group.pk == g.pk]) for g in plan.groups.all()]
    return {
        "vault": plan.vault, "can": access.capabilities(request.user, plan.vault_id),
        "plan": plan, "status": status, "groups": groups, "group_count": len(groups),
        "available_items": [i for i in plan.vault.protected_items.order_by("name") if i.pk not in placed],
        "settings_form": recovery_forms.PlanSettingsForm(plan=plan),
        "mapping_form": recovery_forms.PlanNetworkMappingForm(plan=plan, sites=sites),
        "action_form": recovery_forms.ActionAddForm(plan=plan),
        "phases": ActionPhase.choices, "kinds": ActionKind.choices, "error": error,
        **plan_run_context(plan=plan, status=status),  # the run panel (recovery_plans.run_views)
    }


def _plan(request, pk) -> RecoveryPlan:
    return visible_or_404(services.recovery_plans_for_vault(), request, pk=pk)


@login_required
def plan_list(request):
    vault = current_vault(request)
    if vault is None:
        return redirect("portal:vault-create")
    plans = services.recovery_plans_for_vault(vault=vault)
    rows = [(plan, services.recovery_plan_status(plan=plan)) for plan in plans]
    return render(request, "recovery_plans/plan_list.html", {"vault": vault, "rows": rows})


@login_required
def plan_create(request):
    vault = current_vault(request)
    if vault is None:
        return redirect("portal:vault-create")
    _require_manage(request, vault.pk)
    form = recovery_forms.PlanCreateForm(request.POST or None, vault=vault)
    status = 200
    if request.method == "POST":
        plan = form.submit(user=request.user) if form.is_valid() else None
        if plan:
            messages.success(request, f"Recovery plan {plan.name} created. Add groups, items and actions below.")
            return redirect("portal:plan-detail", pk=plan.pk)
        status = 409 if form.conflict else 400
    return render(request, "recovery_plans/plan_create.html", {"vault": vault, "form": form}, status=status)


@login_required
def plan_detail(request, pk):
    """The plan's page and editor; an HTMX poll gets only its state."""
    plan = _plan(request, pk)
    return render_page(request, "recovery_plans/plan_detail.html", _plan_context(request, plan),
                       partial="status" if request.htmx and request.htmx.target == "plan-status" else None)


@login_required
@require_POST
def plan_edit(request, pk, operation):
    """One edit of the plan. HTMX gets the editor back (with the error, 400 / 409, if the edit
    was refused); a plain form post is redirected to the plan's page."""
    if operation not in recovery_forms.PLAN_EDITS:
        raise Http404("No such edit of a recovery plan.")
    plan = _plan(request, pk)
    _require_manage(request, plan.vault_id)
    extra = {"sites": plan.vault.recovery_sites.all()} if operation == "network-mapping" else {}
    form = recovery_forms.PLAN_EDITS[operation](request.POST, plan=plan, **extra)
    done = form.submit(user=request.user) if form.is_valid() else None
    error = "" if done else (form.error_text() or "The change was refused.")
    status = 200 if done else (409 if form.conflict else 400)
    if not request.htmx:
        if error:
            messages.error(request, error)
        return redirect("portal:plan-detail", pk=plan.pk)
    plan = _plan(request, pk)
    return render_page(request, "recovery_plans/plan_detail.html", _plan_context(request, plan, error=error),
                       partial="editor", status=status)


@login_required
@require_POST
def plan_delete(request, pk):
    plan = _plan(request, pk)
    _require_manage(request, plan.vault_id)
    if request.POST.get("confirm_name", "").strip() != plan.name:
        messages.error(request, f"The plan was not deleted: type its name, {plan.name}, to delete it.")
        return redirect("portal:plan-detail", pk=plan.pk)
    services.recovery_plan_delete(plan=plan)
    messages.success(request, f"Recovery plan {plan.name} deleted; its items stay protected.")
    return redirect("portal:plans")


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
    item = visible_or_404(
        ProtectedItem.objects.select_related(
            "vault", "machine", "recovery_site", "recovery_network", "test_network"
        ), request, pk=pk,
    )
    require(request, item.vault_id, access.OPERATE)
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
