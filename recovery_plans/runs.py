"""Running a recovery plan: test failover, cleanup, planned and unplanned failover, commit.

A run (``RecoveryPlanRun``, states ``recovery_plans.transitions.PLAN_RUN``) is done by one
plan job. The plan job works through the run's stages in order: per group, its pre-actions,
its items, its post-actions. A group's items start together, each as a child job created by
the single-item service (so each item's own checks hold), and the plan job waits (holding
no worker) until all of them ended; the next group starts only then. A script action runs in
the plan job's worker with its timeout; a manual action makes the plan job wait for Resume.

A stage that fails stops the run there (FAILED, with what failed and why); the items of a
group that did not fail still finish. ``retry`` starts a new plan job at that stage (for a
group: only its failed items), ``continue`` at the stage after it (failed items skipped).
Cancel stops the run at the next stage boundary: items already started finish.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from django.db import IntegrityError, transaction
from django.utils import timezone

from core import queues
from core.choices import JobState, JobType
from core.exceptions import Conflict, InvalidTransition, LifeboatError, ValidationFailed
from core.jobs import JobContext, job_cancel, job_create, job_handler, job_resume
from core.models import Job
from core.transitions import transition
from recovery_plans import services
from recovery_plans.models import ActionKind, ActionPhase, PlanRecoveryPoint, RecoveryPlan
from recovery_plans.run_models import PlanOperation, RecoveryPlanRun
from recovery_plans.scripts import script_run
from recovery_plans.transitions import PLAN_RUN
from recovery_plans.transitions import PlanRunState as R
from replication.choices import ProtectionState as P
from replication.choices import TestFailoverState as T
from replication.groups import group_point_latest_complete
from replication.models import ProtectedItem
from vault.models import NetworkPurpose
from vault.services import event_record

logger = logging.getLogger(__name__)

O = PlanOperation

JOB_TYPES = {
    O.TEST_FAILOVER: JobType.PLAN_TEST_FAILOVER,
    O.TEST_FAILOVER_CLEANUP: JobType.PLAN_TEST_FAILOVER_CLEANUP,
    O.PLANNED_FAILOVER: JobType.PLAN_PLANNED_FAILOVER,
    O.UNPLANNED_FAILOVER: JobType.PLAN_UNPLANNED_FAILOVER,
    O.FAILOVER_COMMIT: JobType.PLAN_FAILOVER_COMMIT,
}
# Pre- and post-actions run when VMs come up (as in ASR); cleanup and commit run none.
WITH_ACTIONS = frozenset({O.TEST_FAILOVER, O.PLANNED_FAILOVER, O.UNPLANNED_FAILOVER})
# What a group's item stage says it does.
VERBS = {
    O.TEST_FAILOVER: "test failover", O.TEST_FAILOVER_CLEANUP: "clean up", O.PLANNED_FAILOVER: "fail over",
    O.UNPLANNED_FAILOVER: "fail over", O.FAILOVER_COMMIT: "commit",
}
# A plan picks one point rule for all items ("custom" names one item's point: not for a plan).
PLAN_POINTS = tuple(PlanRecoveryPoint.values)


@dataclass(frozen=True)
class ExtraOperation:
    """An operation a later app runs over a plan's items (failback), registered when that app
    starts (``plan_operation_register``): the runner runs the plan's groups in order (and
    their actions, with ``with_actions``), and the app's own service starts each item's job,
    so each item's own checks hold. This app imports none of it."""

    operation: str  # a PlanOperation value
    job_type: str
    slug: str  # in the portal's URL
    verb: str  # "reprotect": what a group's item stage says it does
    blocker: Callable[[ProtectedItem], str | None]  # why an item cannot take it now (None: it can)
    start: Callable[..., Job]  # start(item=, options=, user=) -> the item's job
    check_options: Callable[[RecoveryPlan, dict], dict] | None = None  # a bad option: ValidationFailed
    with_actions: bool = False
    confirm: str = ""  # the portal's confirmation sentence ("" : none asked)


EXTRA: dict[str, ExtraOperation] = {}


def plan_operation_register(extra: ExtraOperation) -> None:
    EXTRA[extra.operation] = extra
    job_handler(extra.job_type, queue=queues.CONTROL, on_failure=_run_ended)(run_plan)


def _verb(operation: str) -> str:
    return EXTRA[operation].verb if operation in EXTRA else VERBS[operation]


def _with_actions(operation: str) -> bool:
    return EXTRA[operation].with_actions if operation in EXTRA else operation in WITH_ACTIONS


# --- the stages of a run ----------------------------------------------------------------------


def _label(group: dict) -> str:
    return f"Group {group['order']}" + (f" ({group['name']})" if group.get("name") else "")


def _snapshot(plan: RecoveryPlan) -> list[dict]:
    """The plan's groups as a run sees them (item ids and names, actions in order)."""
    groups = []
    for group in plan.groups.all():
        actions = sorted(group.actions.all(), key=lambda a: (a.phase != ActionPhase.PRE, a.order))
        groups.append({
            "order": group.order, "name": group.name,
            "items": [[str(i.pk), i.name] for i in sorted(group.items.all(), key=lambda i: i.name)],
            "actions": [{"phase": a.phase, "kind": a.kind, "name": a.name, "script": a.script,
                         "timeout_seconds": a.timeout_seconds, "instructions": a.instructions} for a in actions],
        })
    return groups


def run_stages(run: RecoveryPlanRun) -> list[dict]:
    """Every stage of the run in order: ``{"group", "kind": "action" | "items", "name", ...}``."""
    stages = []
    for index, group in enumerate(run.groups):
        label = _label(group)
        actions = group["actions"] if _with_actions(run.operation) else []
        for phase in (ActionPhase.PRE, ActionPhase.POST):
            if phase == ActionPhase.POST:
                count = len(group["items"])
                stages.append({"group": index, "kind": "items", "label": label,
                               "name": f"{label}: {_verb(run.operation)} {count} item{'s' if count != 1 else ''}"})
            for action in (a for a in actions if a["phase"] == phase):
                when = "before" if phase == ActionPhase.PRE else "after"
                kind = "script" if action["kind"] == ActionKind.SCRIPT else "manual action"
                stages.append({"group": index, "kind": "action", "label": label, "action": action,
                               "name": f"{label}: {kind} {when}: {action['name']}"})
    return stages


# --- starting, resuming, cancelling, retrying -------------------------------------------------


def _blocker(operation: str, item: ProtectedItem) -> str | None:
    """Why the item's state forbids the operation (None if it allows it)."""
    if operation in EXTRA:
        return EXTRA[operation].blocker(item)
    state = item.get_protection_state_display().lower()
    if operation == O.TEST_FAILOVER:
        if item.protection_state not in P.TEST_FAILOVER_ALLOWED:
            return f"{item.name} is {state}"
        if item.test_failover_state != T.NONE:
            return f"{item.name}: {item.get_test_failover_state_display().lower()}"
    elif operation == O.TEST_FAILOVER_CLEANUP:
        if item.test_failover_state != T.SUCCEEDED:
            return f"{item.name} has no test failover to clean up ({item.get_test_failover_state_display().lower()})"
    elif operation in (O.PLANNED_FAILOVER, O.UNPLANNED_FAILOVER):
        if item.protection_state != P.PROTECTED:
            return f"{item.name} is {state}"
    elif operation == O.FAILOVER_COMMIT:
        if item.protection_state != P.FAILED_OVER:
            return f"{item.name} is {state}, not failed over"
    return None


def _checked_options(plan: RecoveryPlan, operation: str, options: dict) -> dict:
    """The run's options, with the plan's defaults filled in; a bad one is a 400."""
    options = dict(options or {})
    if operation in EXTRA:
        check = EXTRA[operation].check_options
        return check(plan, options) if check is not None else {}
    if operation in (O.TEST_FAILOVER, O.UNPLANNED_FAILOVER):
        point = options.get("recoveryPoint") or plan.recovery_point_type
        if point not in PLAN_POINTS:
            raise ValidationFailed(
                f"'{point}' is not a recovery point rule for a plan; use one of {', '.join(PLAN_POINTS)}.",
                extra={"fields": {"recoveryPoint": [f"one of {', '.join(PLAN_POINTS)}"]}},
            )
        options["recoveryPoint"] = point
    if operation == O.UNPLANNED_FAILOVER:
        options["shutDownSource"] = bool(options.get("shutDownSource", True))
    if operation == O.TEST_FAILOVER_CLEANUP:
        options["comments"] = (options.get("comments") or "").strip()
        if len(options["comments"]) > 4000:
            raise ValidationFailed("The comments are longer than 4000 characters.",
                                   extra={"fields": {"comments": ["too long"]}})
    options["network"] = (options.get("network") or "").strip()
    return options


def _item_network(item: ProtectedItem, readiness, operation: str, network: str):
    """The network the item's VM goes on in this run: the run's ``network`` (a name, at every
    item's site), else the plan's mapping, else the item's own."""
    purpose = NetworkPurpose.TEST if operation == O.TEST_FAILOVER else NetworkPurpose.RECOVERY
    if network:
        return services.recovery_network_choose(item=item, network=network, purpose=purpose)
    chosen = readiness.test_network if purpose == NetworkPurpose.TEST else readiness.recovery_network
    if chosen is None:
        site = item.recovery_site.name if item.recovery_site else None
        what = "test network" if purpose == NetworkPurpose.TEST else "recovery network"
        raise ValidationFailed(
            f"{item.name} has no {what} to go on: " + (
                f"add one to the recovery site {site} or map one in the plan." if site else
                "it has no recovery site; choose one on its page."),
            extra={"fields": {"network": [f"no {what} for {item.name}"]}},
        )
    return chosen


def _check_inputs(plan: RecoveryPlan, operation: str, options: dict, status) -> None:
    """Every item's network and recovery point exist (nothing starts otherwise). The members
    of a replication group go to its newest complete shared point (chosen here, once, for
    the whole run: ``options["groupPoints"]``)."""
    if operation in EXTRA:
        return  # the operation's own options check (check_options) said what it needs
    if operation in (O.TEST_FAILOVER, O.UNPLANNED_FAILOVER):
        options["groupPoints"] = _group_points([r.item for r in status.items])
    for readiness in status.items:
        item = readiness.item
        if operation in (O.TEST_FAILOVER, O.PLANNED_FAILOVER, O.UNPLANNED_FAILOVER):
            _item_network(item, readiness, operation, options["network"])
        if operation in (O.TEST_FAILOVER, O.UNPLANNED_FAILOVER) and _group_point_of(item, options) is None:
            services.recovery_point_choose(item=item, point=options["recoveryPoint"])


def _group_points(items: list[ProtectedItem]) -> dict[str, dict]:
    """Per replication group of these items: its newest complete shared point and each
    member's recovery point of it. A group without one is a 400."""
    chosen: dict[str, dict] = {}
    for group in {i.replication_group for i in items if i.replication_group_id is not None}:
        point = group_point_latest_complete(group=group)
        if point is None:
            raise ValidationFailed(
                f"The replication group {group.name} has no complete shared recovery point yet (one that every "
                "member has): its members fail over together only to one. Take one on the group's page, or wait for "
                "the next.", extra={"fields": {"recoveryPoint": [f"no shared point of {group.name}"]}},
            )
        chosen[str(group.pk)] = {"id": str(point.pk), "points": {
            str(item): str(pk) for pk, item in point.item_points.values_list("pk", "item_id")}}
    return chosen


def _group_point_of(item: ProtectedItem, options: dict) -> str | None:
    """The item's recovery point (id) of its group's shared point chosen for the run, if any."""
    group = (options.get("groupPoints") or {}).get(str(item.replication_group_id))
    return group["points"].get(str(item.pk)) if group else None


def _plan_job(run: RecoveryPlanRun, *, start: int, only_items: list[str] | None, user) -> Job:
    stages = run_stages(run)[start:]
    return job_create(
        job_type=EXTRA[run.operation].job_type if run.operation in EXTRA else JOB_TYPES[run.operation],
        vault=run.plan.vault, target_type="recovery_plan", target_id=str(run.plan.pk),
        target_name=run.plan.name, params={"run": run.pk, "start": start, "only_items": only_items},
        steps=[s["name"] for s in stages], created_by=user,
    )


def recovery_plan_run_start(*, plan: RecoveryPlan, operation: str, options: dict | None = None, user=None):
    """Start ``operation`` on every item of the plan, group after group. Refused (409) when an
    item's state forbids it or the plan is already running; a bad option (400) changes
    nothing. Returns ``(run, job)``."""
    if operation not in O.values:
        raise ValidationFailed(f"'{operation}' is not an operation of a recovery plan.")
    plan = services.recovery_plans_for_vault().get(pk=plan.pk)
    status = services.recovery_plan_status(plan=plan)
    what = O(operation).label.lower()
    if not status.items:
        raise ValidationFailed(f"The plan {plan.name} has no items; add items to it before a {what}.")
    blockers = [b for b in (_blocker(operation, r.item) for r in status.items) if b]
    if blockers:
        raise InvalidTransition(
            f"Cannot start a {what} of the plan {plan.name}: {'; '.join(blockers)}.",
            current_state=status.state, operation=operation,
        )
    options = _checked_options(plan, operation, options or {})
    _check_inputs(plan, operation, options, status)
    try:
        with transaction.atomic():
            RecoveryPlan.objects.select_for_update().get(pk=plan.pk)
            running = plan.runs.filter(state__in=R.ACTIVE).first()
            if running is not None:
                raise _busy(plan, running)
            run = RecoveryPlanRun.objects.create(
                plan=plan, operation=operation, options=options, groups=_snapshot(plan),
                created_by=user if getattr(user, "is_authenticated", False) else None,
            )
            job = _plan_job(run, start=0, only_items=None, user=user)
            RecoveryPlanRun.objects.filter(pk=run.pk).update(job=job)
            run.job = job
            event_record(vault=plan.vault, kind="recovery_plan", job=job,
                         message=f"{O(operation).label} of the recovery plan {plan.name} started.")
    except IntegrityError:  # a second start won the race for the plan
        raise Conflict(f"The recovery plan {plan.name} is already running an operation.", code="invalid_state") from None
    return run, job


def _busy(plan: RecoveryPlan, run: RecoveryPlanRun) -> Conflict:
    return Conflict(
        f"The recovery plan {plan.name} is already running a {run.get_operation_display().lower()} "
        f"({run.get_state_display().lower()}); wait for it to end or cancel it.",
        code="invalid_state", extra={"current_state": run.state, "operation": run.operation,
                                     **({"job": str(run.job_id)} if run.job_id else {})},
    )


def recovery_plan_run_latest(*, plan: RecoveryPlan) -> RecoveryPlanRun | None:
    return RecoveryPlanRun.objects.filter(plan=plan).select_related("job", "plan").order_by("-created_at").first()


def _latest(plan: RecoveryPlan, doing: str) -> RecoveryPlanRun:
    run = recovery_plan_run_latest(plan=plan)
    if run is None:
        raise InvalidTransition(f"Cannot {doing}: the plan {plan.name} has never run.", current_state="",
                                operation=doing)
    return run


def recovery_plan_run_resume(*, plan: RecoveryPlan, user=None) -> RecoveryPlanRun:
    """The admin did the manual action the run waits for: the run goes on."""
    run = _latest(plan, "resume")
    if run.state != R.WAITING_FOR_ACTION:
        raise InvalidTransition(
            f"The plan {plan.name} is not waiting for a manual action "
            f"(its {run.get_operation_display().lower()} is {run.get_state_display().lower()}); there is nothing to resume.",
            current_state=run.state, operation="resume",
        )
    with transaction.atomic():  # the job is sent on commit: the run says RUNNING before the worker sees it
        transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.RUNNING, operation="resume",
                   from_states={R.WAITING_FOR_ACTION}, quiet=True)
        job_resume(job_id=run.job_id, user=user)
    run.refresh_from_db()
    return run


def recovery_plan_run_cancel(*, plan: RecoveryPlan, user=None) -> RecoveryPlanRun:
    """Stop the run at its next stage boundary (items already started finish)."""
    run = _latest(plan, "cancel")
    if run.state not in (R.NOT_STARTED, R.RUNNING, R.WAITING_FOR_ACTION):
        raise InvalidTransition(
            f"The plan's {run.get_operation_display().lower()} is {run.get_state_display().lower()}; there is nothing "
            "to cancel.", current_state=run.state, operation="cancel",
        )
    job = job_cancel(job_id=run.job_id, user=user)
    if job.state == JobState.CANCELLING:
        transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.CANCELLING, operation="cancel", quiet=True)
    run.refresh_from_db()
    return run


def recovery_plan_run_retry(*, plan: RecoveryPlan, skip_failed: bool = False, user=None):
    """Go on with a failed run: ``retry`` the stage it stopped at (for a group: only its failed
    items), or ``continue`` after it (``skip_failed``: the failed items are left as they are).
    Returns ``(run, job)``; ``job`` is None when nothing was left to run (the run succeeded)."""
    doing = "continue" if skip_failed else "retry"
    run = _latest(plan, doing)
    if run.state != R.FAILED or run.stopped_stage is None:
        raise InvalidTransition(
            f"Cannot {doing} the plan {plan.name}: its last run ({run.get_operation_display().lower()}) is "
            f"{run.get_state_display().lower()}, not failed.", current_state=run.state, operation=doing,
        )
    stages = run_stages(run)
    stopped = run.stopped_stage
    failed = [pk for pk, info in run.items.items() if info.get("state") == "FAILED"]
    # A retry of a group's items runs only the failed ones; a continue goes on after the stage.
    only = failed if not skip_failed and stages[stopped]["kind"] == "items" else None
    start = stopped + 1 if skip_failed else stopped
    with transaction.atomic():
        moved = transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.RUNNING, operation=doing,
                           from_states={R.FAILED})
        items = dict(moved.items)
        if skip_failed:
            for pk in failed:
                items[pk] = {**items[pk], "state": "SKIPPED"}
        job = _plan_job(moved, start=start, only_items=only, user=user) if start < len(stages) else None
        if job is None:
            transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.SUCCEEDED, operation=doing,
                       items=items, message="Every stage has run; the failed items were skipped.")
            moved.refresh_from_db()
            return moved, None
        RecoveryPlanRun.objects.filter(pk=run.pk).update(job=job, items=items, stopped_stage=None, message="")
        event_record(vault=plan.vault, kind="recovery_plan", job=job,
                     message=f"{'Continuing' if skip_failed else 'Retrying'} the {run.get_operation_display().lower()} "
                             f"of the recovery plan {plan.name} at '{stages[start]['name']}'.")
    moved.refresh_from_db()
    return moved, job


# --- the plan job -------------------------------------------------------------------------------


def _start_item(run: RecoveryPlanRun, item: ProtectedItem, readiness, user) -> Job:
    """The item's own service starts its job (its own checks hold)."""
    options, operation = run.options, run.operation
    if operation in EXTRA:
        return EXTRA[operation].start(item=item, options=options, user=user)
    if operation in (O.TEST_FAILOVER, O.PLANNED_FAILOVER, O.UNPLANNED_FAILOVER):
        if readiness is None:  # taken out of the plan since the run started: its own mapping
            purpose = NetworkPurpose.TEST if operation == O.TEST_FAILOVER else NetworkPurpose.RECOVERY
            network = services.recovery_network_choose(item=item, network=options.get("network") or None, purpose=purpose)
        else:
            network = _item_network(readiness.item, readiness, operation, options.get("network", ""))
    shared = _group_point_of(item, options)  # a replication group's member: its share of the group point
    point = "custom" if shared else options.get("recoveryPoint")
    if operation == O.TEST_FAILOVER:
        _, job = services.protected_item_test_failover(item=item, point=point, recovery_point_id=shared, network=network,
                                                       user=user)
    elif operation == O.TEST_FAILOVER_CLEANUP:
        _, job = services.protected_item_test_failover_cleanup(item=item, notes=options.get("comments", ""), user=user)
    elif operation == O.PLANNED_FAILOVER:
        _, job = services.protected_item_planned_failover(item=item, network=network, user=user)
    elif operation == O.UNPLANNED_FAILOVER:
        _, job = services.protected_item_unplanned_failover(
            item=item, point=point, recovery_point_id=shared, shut_down_source=options.get("shutDownSource", True),
            network=network, user=user,
        )
    else:
        _, job = services.protected_item_failover_commit(item=item, user=user)
    return job


def _items_stage(ctx: JobContext, run: RecoveryPlanRun, stage: dict, item_ids: list[str]) -> None:
    """Start the group's items together (once), wait until all ended, then judge the group."""
    group = run.groups[stage["group"]]
    names = dict(group["items"])
    started = ctx.memo.setdefault("start_errors", {})
    children = {j.target_id: j for j in Job.objects.filter(parent=ctx.job.pk, target_id__in=item_ids)}
    key = str(stage["group"])
    if key not in started:
        status = services.recovery_plan_status(plan=services.recovery_plans_for_vault().get(pk=run.plan_id))
        readiness = {str(r.item.pk): r for r in status.items}
        errors = {}
        for item_id in item_ids:
            if item_id in children:
                continue
            item = ProtectedItem.objects.filter(pk=item_id).first()
            try:
                if item is None:
                    raise ValidationFailed(f"{names[item_id]} is no longer protected.")
                with transaction.atomic():
                    child = _start_item(run, item, readiness.get(item_id), ctx.job.created_by)
                    # Created as a child of the plan job, before its message is sent (on commit).
                    Job.objects.filter(pk=child.pk).update(parent=ctx.job)
                children[item_id] = child
            except LifeboatError as exc:
                errors[item_id] = f"it could not start: {exc.message}"
        started[key] = errors
        ctx.progress(5, message=f"{len(children)} of {len(item_ids)} item job(s) started.")
    errors = started[key]
    children = {j.target_id: j for j in Job.objects.filter(parent=ctx.job.pk, target_id__in=item_ids)}
    ended = [j for j in children.values() if j.state in JobState.TERMINAL]
    if len(ended) < len(children):
        ctx.wait(f"{stage['label']}: {len(ended)} of {len(children)} item job(s) ended; waiting for the others.",
                 key=f"children:{ctx.job.pk}", check_after=30,
                 progress=100 * (len(ended) + len(errors)) / max(1, len(item_ids)))
    items = dict(RecoveryPlanRun.objects.get(pk=run.pk).items)
    failed = []
    for item_id in item_ids:
        job = children.get(item_id)
        entry = {"name": names[item_id], "group": group["order"], "job": str(job.pk) if job else None}
        if job is not None and job.state == JobState.SUCCEEDED:
            entry.update(state="SUCCEEDED", error="")
        else:
            why = errors.get(item_id) or (job.error if job is not None else "") or "its job ended without a reason."
            entry.update(state="FAILED", error=why)
            failed.append(f"{names[item_id]} failed: {why}")
        items[item_id] = entry
    RecoveryPlanRun.objects.filter(pk=run.pk).update(items=items)
    ok = [names[i] for i in item_ids if items[i]["state"] == "SUCCEEDED"]
    if failed:
        raise StageFailed(
            f"{stage['label']}: {' '.join(failed)}"
            + (f" {_join(ok)} finished." if ok else "")
        )
    ctx.summary(f"{_join(ok)} done." if ok else "No items to run.")


def _join(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


class StageFailed(LifeboatError):
    """A stage of the run failed; the run stops there."""


def _script_stage(ctx: JobContext, run: RecoveryPlanRun, stage: dict) -> None:
    action = stage["action"]
    entry = ctx._entry(stage["name"])
    ctx.progress(0, message=f"Running: {action['script']}")
    env = {"LIFEBOAT_PLAN": run.plan.name, "LIFEBOAT_PLAN_OPERATION": run.operation,
           "LIFEBOAT_GROUP": str(run.groups[stage["group"]]["order"]), "LIFEBOAT_JOB": str(ctx.job.pk)}
    outcome = script_run(command=action["script"], timeout=action["timeout_seconds"], env=env, alive=ctx.heartbeat)
    entry["script"] = outcome
    if outcome["timed_out"]:
        raise StageFailed(f"{stage['label']}: the script '{action['name']}' did not end within its timeout of "
                          f"{action['timeout_seconds']} s and was stopped.{_output_hint(outcome)}")
    if outcome["exit_code"] != 0:
        raise StageFailed(f"{stage['label']}: the script '{action['name']}' failed with exit code "
                          f"{outcome['exit_code']}.{_output_hint(outcome)}")
    ctx.summary(f"Exit code 0 after {outcome['seconds']} s.")


def _output_hint(outcome: dict) -> str:
    last = next((line for line in reversed((outcome["stderr"] or outcome["stdout"]).splitlines()) if line.strip()), "")
    return f" Its last output: {last[:300]}" if last else ""


def _manual_stage(ctx: JobContext, run: RecoveryPlanRun, stage: dict) -> None:
    action = stage["action"]
    # A Resume given while the plan waited for something else does not count for this action.
    if ctx.memo.get("manual_action") != stage["name"]:
        ctx.memo.pop("resumed", None)
        ctx.memo["manual_action"] = stage["name"]
    if stage["name"] not in ctx.memo.get("actions", {}) and "resumed" not in ctx.memo:
        transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.WAITING_FOR_ACTION, operation="wait",
                   from_states={R.RUNNING}, quiet=True)
    done = ctx.wait_for_action(
        stage["name"], f"{stage['label']}: manual action '{action['name']}': {action['instructions']} "
                       "Resume the plan when it is done.",
    )
    ctx.summary(f"Done; resumed by {done.get('by') or 'an administrator'}.")


def run_plan(ctx: JobContext) -> dict:
    run = RecoveryPlanRun.objects.select_related("plan").get(pk=ctx.params["run"])
    transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.RUNNING, operation="run",
               from_states={R.NOT_STARTED, R.WAITING_FOR_ACTION}, quiet=True)
    stages = run_stages(run)
    start, only = ctx.params.get("start", 0), ctx.params.get("only_items")
    for index in range(start, len(stages)):
        stage = stages[index]
        if ctx.done(stage["name"]):
            continue
        ctx.memo["stage"] = index
        with ctx.step(stage["name"]):
            if stage["kind"] == "items":
                ids = [pk for pk, _name in run.groups[stage["group"]]["items"]]
                if index == start and only is not None:
                    ids = [pk for pk in ids if pk in only]
                _items_stage(ctx, run, stage, ids)
            elif stage["action"]["kind"] == ActionKind.SCRIPT:
                _script_stage(ctx, run, stage)
            else:
                _manual_stage(ctx, run, stage)
    ctx.check_cancel()  # a cancel that came during the last stage ends the run as cancelled
    run.refresh_from_db()
    done = [info["name"] for info in run.items.values() if info.get("state") == "SUCCEEDED"]
    skipped = [info["name"] for info in run.items.values() if info.get("state") == "SKIPPED"]
    message = f"{run.get_operation_display()} of the plan done: {_join(done)}." + (
        f" Skipped: {_join(skipped)}." if skipped else "")
    transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.SUCCEEDED, operation="finish",
               from_states={R.RUNNING, R.CANCELLING}, quiet=True, message=message, stopped_stage=None)
    return {"message": message, "items": done}


def _run_ended(job: Job, error: str) -> None:
    """The plan job failed or was cancelled: the run says where it stopped and what was recovered."""
    run = RecoveryPlanRun.objects.filter(pk=(job.params or {}).get("run"), job=job.pk).first()
    if run is None:
        return
    stage = (job.memo or {}).get("stage", job.params.get("start", 0))
    stages = run_stages(run)
    where = stages[stage]["name"] if stage < len(stages) else "the end"
    children = Job.objects.filter(parent__in=Job.objects.filter(target_type="recovery_plan",
                                                                target_id=str(run.plan_id), params__run=run.pk))
    done, going = [], []
    for child in children.order_by("created_at"):
        (done if child.state == JobState.SUCCEEDED else going if child.state in JobState.ACTIVE else []).append(
            child.target_name)
    said = f"Done: {_join(done)}." + (f" Still finishing (their jobs go on): {_join(going)}." if going else "")
    if job.state == JobState.CANCELLED:
        message = f"Cancelled by an administrator at '{where}'; nothing after it was started. {said}"
        if run.state in (R.RUNNING, R.WAITING_FOR_ACTION):
            transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.CANCELLING, operation="cancel", quiet=True)
        transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.CANCELLED, operation="cancel", quiet=True,
                   from_states={R.NOT_STARTED, R.CANCELLING}, message=message, stopped_stage=stage)
        Job.objects.filter(pk=job.pk).update(error=message)
        return
    message = (f"{error} The plan stopped at '{where}'. {said} Retry (the failed part only) or continue "
               "without it.")
    if run.state == R.NOT_STARTED:  # its job was failed before a worker took it
        transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.RUNNING, operation="fail", quiet=True)
    transition(PLAN_RUN, model=RecoveryPlanRun, pk=run.pk, to_state=R.FAILED, operation="fail", quiet=True,
               message=message, stopped_stage=stage)


for _type in JOB_TYPES.values():
    job_handler(_type, queue=queues.CONTROL, on_failure=_run_ended)(run_plan)


# --- what a page shows ---------------------------------------------------------------------------


def recovery_plan_run_tree(*, run: RecoveryPlanRun) -> list[dict]:
    """The run as a tree: per group, its stages (actions with their script output, items with
    their latest job), newest outcome of each stage across the run's plan jobs."""
    jobs = list(Job.objects.filter(target_type="recovery_plan", target_id=str(run.plan_id), params__run=run.pk)
                .order_by("created_at"))
    steps: dict[str, dict] = {}
    for job in jobs:
        for entry in job.steps:
            if entry.get("state") != "PENDING" or entry["name"] not in steps:
                steps[entry["name"]] = {**entry, "job": job}
    children = {}
    for child in Job.objects.filter(parent__in=[j.pk for j in jobs]).order_by("created_at"):
        children[child.target_id] = child
    groups = []
    for stage in run_stages(run):
        if not groups or groups[-1]["index"] != stage["group"]:
            groups.append({"index": stage["group"], "label": stage["label"], "stages": []})
        entry = steps.get(stage["name"], {"name": stage["name"], "state": "PENDING", "progress": 0})
        row = {"stage": stage, "step": entry, "items": []}  # a template's row.items must not find dict.items
        if stage["kind"] == "items":
            row["items"] = [{"id": pk, "name": name, "job": children.get(pk), "outcome": run.items.get(pk, {})}
                            for pk, name in run.groups[stage["group"]]["items"]]
        groups[-1]["stages"].append(row)
    return groups


def plan_job_run(*, job: Job) -> RecoveryPlanRun | None:
    """The run a plan job works for (None for other jobs)."""
    if job.target_type != "recovery_plan" or not (job.params or {}).get("run"):
        return None
    return RecoveryPlanRun.objects.select_related("plan", "job").filter(pk=job.params["run"]).first()


def recovery_plan_run_when(run: RecoveryPlanRun) -> str:
    return timezone.localtime(run.created_at).strftime("%Y-%m-%d %H:%M:%S")
