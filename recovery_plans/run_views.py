"""The portal's controls of a plan's run: the operation buttons, Resume, Cancel, Retry,
Continue, and the live tree of the run (polled while the run is active)."""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from core.exceptions import LifeboatError
from core import access
from core.portal import HTMX_STOP_POLLING, require, visible_or_404
from recovery_plans import runs, services
from recovery_plans.models import PlanRecoveryPoint, RecoveryPlan
from recovery_plans.run_models import PlanOperation

# URL slug -> operation
OPERATION_SLUGS = {
    "test-failover": PlanOperation.TEST_FAILOVER,
    "test-failover-cleanup": PlanOperation.TEST_FAILOVER_CLEANUP,
    "planned-failover": PlanOperation.PLANNED_FAILOVER,
    "unplanned-failover": PlanOperation.UNPLANNED_FAILOVER,
    "failover-commit": PlanOperation.FAILOVER_COMMIT,
}
CONTROLS = ("resume", "cancel", "retry", "continue")
# The portal asks for a ticked confirmation before these (a real failover, a commit).
CONFIRMED = ("planned-failover", "unplanned-failover", "failover-commit")


def plan_run_context(*, plan: RecoveryPlan, status=None) -> dict:
    """What the plan page's run panel shows: the latest run as a tree and the operations the
    items' states allow now."""
    status = status or services.recovery_plan_status(plan=plan)
    run = runs.recovery_plan_run_latest(plan=plan)
    active = run is not None and run.is_active
    operations = []
    if not active and status.items:
        operations = [(slug, PlanOperation(op).label, _confirm_sentence(slug)) for slug, op in _slugs().items()
                      if not any(runs._blocker(op, r.item) for r in status.items)]
    return {
        "plan": plan, "run": run, "run_active": active, "run_operations": operations,
        "run_tree": runs.recovery_plan_run_tree(run=run) if run else [], "plan_points": runs.PLAN_POINTS,
        "plan_point_choices": PlanRecoveryPoint.choices, "run_confirmed_operations": _confirmed(),
    }


def _slugs() -> dict[str, str]:
    """Every operation's URL slug: this app's, then those later apps registered (failback)."""
    return {**OPERATION_SLUGS, **{e.slug: e.operation for e in runs.EXTRA.values()}}


def _confirm_sentence(slug: str) -> str:
    """What the confirmation box of the operation says ("" : none is asked)."""
    extra = next((e for e in runs.EXTRA.values() if e.slug == slug), None)
    if extra is not None:
        return extra.confirm
    if slug not in CONFIRMED:
        return ""
    return "commit: the failover is final" if slug == "failover-commit" else "fail the plan's VMs over for real"


def _confirmed() -> tuple[str, ...]:
    return (*CONFIRMED, *(e.slug for e in runs.EXTRA.values() if e.confirm))


@login_required
def plan_run_panel(request, pk):
    """The run panel alone (the plan page polls it while a run is active)."""
    plan = visible_or_404(services.recovery_plans_for_vault(), request, pk=pk)
    context = {**plan_run_context(plan=plan), "can": access.capabilities(request.user, plan.vault_id)}
    response = render(request, "recovery_plans/plan_run.html", context)
    if request.htmx and not context["run_active"]:
        response.status_code = HTMX_STOP_POLLING
    return response


@login_required
@require_POST
def plan_run_operation(request, pk, operation):
    """Start an operation of the plan, or resume / cancel / retry / continue its run."""
    slugs = _slugs()
    if operation not in slugs and operation not in CONTROLS:
        raise Http404("No such operation of a recovery plan.")
    plan = visible_or_404(RecoveryPlan.objects.all(), request, pk=pk)
    require(request, plan.vault_id, access.OPERATE)
    post = request.POST
    try:
        if operation == "resume":
            runs.recovery_plan_run_resume(plan=plan, user=request.user)
            messages.success(request, "The plan goes on.")
        elif operation == "cancel":
            runs.recovery_plan_run_cancel(plan=plan, user=request.user)
            messages.info(request, "Cancellation requested: the plan stops at its next safe point.")
        elif operation in ("retry", "continue"):
            runs.recovery_plan_run_retry(plan=plan, skip_failed=operation == "continue", user=request.user)
            messages.success(request, "The plan goes on." if operation == "continue" else "Retrying the failed part.")
        elif operation in _confirmed() and post.get("confirm") != "on":
            messages.error(request, f"Tick the confirmation to start a {PlanOperation(slugs[operation]).label.lower()} "
                                    f"of {plan.name}; nothing was started.")
        else:
            options = {"recoveryPoint": post.get("recoveryPoint") or None, "network": post.get("network", ""),
                       "comments": post.get("comments", ""), "shutDownSource": post.get("shutDownSource") == "on"}
            if operation not in OPERATION_SLUGS:  # a later app's operation: its own fields
                options = {k: v for k, v in post.items() if k not in ("csrfmiddlewaretoken", "confirm")}
            op = PlanOperation(slugs[operation])
            runs.recovery_plan_run_start(plan=plan, operation=op, options=options, user=request.user)
            messages.success(request, f"{op.label} of {plan.name} started.")
    except LifeboatError as exc:
        messages.error(request, exc.message)
    return redirect(reverse("portal:plan-detail", args=[plan.pk]) + "#plan-run")
