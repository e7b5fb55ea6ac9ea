"""Failback of a whole recovery plan: reprotect, fail over to on-premises, commit and
re-enable, group after group, run by the plan runner (``recovery_plans.runs``), each item's
job started by failback's own service. Registered when the app starts."""
from __future__ import annotations

from core.choices import JobType
from core.exceptions import ValidationFailed
from failback import services
from failback.models import FailbackLocation
from failback.transitions import FailbackState as F
from recovery_plans.run_models import PlanOperation
from recovery_plans.runs import PLAN_POINTS, ExtraOperation, plan_operation_register
from replication.choices import Direction
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem

REPROTECT_OPTIONS = ("location", "processServer", "masterTarget", "vcenter", "targetHost", "targetDatastore",
                     "targetNetwork")


def _failback_state(item: ProtectedItem, wanted: str, doing: str) -> str | None:
    if item.direction == Direction.RECOVERY_TO_PRIMARY:
        return f"{item.name} is a replication back to on-premises, not an item of the plan's"
    failback = services.current_failback(item=item)
    if failback is None:
        return f"{item.name} has no failback under way"
    if failback.state != wanted:
        return f"{item.name}: its failback is {failback.get_state_display().lower()}, so it cannot {doing}"
    if wanted == F.REPLICATING_BACK and (failback.returning_item is None
                                         or failback.returning_item.protection_state != P.PROTECTED):
        state = failback.returning_item.get_protection_state_display().lower() if failback.returning_item else "gone"
        return f"{item.name}: its replication to on-premises is {state}"
    return None


def _reprotect_blocker(item: ProtectedItem) -> str | None:
    if item.direction == Direction.RECOVERY_TO_PRIMARY:
        return f"{item.name} is a replication back to on-premises, not an item of the plan's"
    if item.protection_state != P.FAILOVER_COMMITTED:
        return f"{item.name} is {item.get_protection_state_display().lower()}, not a committed failover"
    return None


def _reprotect_options(plan, options: dict) -> dict:
    options = {k: str(options.get(k) or "").strip() for k in REPROTECT_OPTIONS}
    options["location"] = options["location"] or FailbackLocation.ORIGINAL
    if options["location"] not in FailbackLocation.values:
        raise ValidationFailed(f"'{options['location']}' is not a failback location; use ORIGINAL or ALTERNATE.",
                               extra={"fields": {"location": ["ORIGINAL or ALTERNATE"]}})
    return options


def _reprotect(*, item, options: dict, user):
    _, job = services.failback_reprotect(
        item=item, location=options["location"], process_server=options.get("processServer") or None,
        master_target=options.get("masterTarget") or None, vcenter=options.get("vcenter") or None,
        target_host=options.get("targetHost", ""), target_datastore=options.get("targetDatastore", ""),
        target_network=options.get("targetNetwork", ""), user=user)
    return job


def _failback_options(plan, options: dict) -> dict:
    kind = str(options.get("type") or "planned")
    if kind not in services.FAILBACK_TYPES:
        raise ValidationFailed(f"'{kind}' is not a failover type; use planned or unplanned.",
                               extra={"fields": {"type": ["planned or unplanned"]}})
    point = str(options.get("recoveryPoint") or "latest")
    if point not in PLAN_POINTS:
        raise ValidationFailed(f"'{point}' is not a recovery point rule for a plan; use one of {', '.join(PLAN_POINTS)}.",
                               extra={"fields": {"recoveryPoint": [f"one of {', '.join(PLAN_POINTS)}"]}})
    shut = options.get("shutDownRecoveredVm", True)
    return {"type": kind, "recoveryPoint": point, "shutDownRecoveredVm": shut not in (False, "false", "off", "0", "")}


def _failback(*, item, options: dict, user):
    _, job = services.failback_failover(item=item, failover_type=options["type"], point=options["recoveryPoint"],
                                        shut_down=options["shutDownRecoveredVm"], user=user)
    return job


def _commit(*, item, options: dict, user):
    return services.failback_commit(item=item, user=user)[1]


def _reenable(*, item, options: dict, user):
    return services.failback_reenable(item=item, user=user)[1]


def register() -> None:
    plan_operation_register(ExtraOperation(
        operation=PlanOperation.REPROTECT, job_type=JobType.PLAN_REPROTECT, slug="reprotect", verb="reprotect",
        blocker=_reprotect_blocker, start=_reprotect, check_options=_reprotect_options,
        confirm="replicate the plan's recovered VMs back on-premises"))
    plan_operation_register(ExtraOperation(
        operation=PlanOperation.FAILBACK, job_type=JobType.PLAN_FAILBACK, slug="failback", verb="fail back",
        blocker=lambda item: _failback_state(item, F.REPLICATING_BACK, "fail back"), start=_failback,
        check_options=_failback_options, with_actions=True,
        confirm="fail the plan's VMs over to on-premises for real"))
    plan_operation_register(ExtraOperation(
        operation=PlanOperation.FAILBACK_COMMIT, job_type=JobType.PLAN_FAILBACK_COMMIT, slug="failback-commit",
        verb="commit the failback of", blocker=lambda item: _failback_state(item, F.FAILED_BACK, "commit"),
        start=_commit, confirm="commit: the failback is final"))
    plan_operation_register(ExtraOperation(
        operation=PlanOperation.REENABLE, job_type=JobType.PLAN_REENABLE, slug="reenable",
        verb="re-enable replication of", blocker=lambda item: _failback_state(item, F.COMMITTED, "re-enable"),
        start=_reenable, confirm="protect the plan's VMs to the recovery site again (their recovered VMs are deleted)"))
