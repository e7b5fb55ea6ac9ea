"""Services of recovery: test failover and its cleanup, planned and unplanned failover,
change recovery point and commit, for one protected item.

Each service checks its input first (nothing changes on bad input: ``ValidationFailed``),
then, in one transaction, moves the item's state with a compare-and-set (a second click
while one runs gets ``InvalidTransition`` / ``Conflict``, the API's 409) and creates the job
that does the work (``recovery_plans.jobs``). Each returns ``(item, job)``.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, Prefetch, QuerySet

from core.choices import JobState, JobType
from core.exceptions import Conflict, InvalidTransition, ValidationFailed
from core.jobs import job_create
from core.models import Job
from recovery_plans.choices import PlanState
from recovery_plans.models import (
    SCRIPT_TIMEOUT_DEFAULT_SECONDS,
    ActionKind,
    ActionPhase,
    PlanRecoveryPoint,
    RecoveredVm,
    RecoveredVmKind,
    RecoveryPlan,
    RecoveryPlanAction,
    RecoveryPlanGroup,
    RecoveryPlanNetworkMapping,
)
from recovery_plans.run_models import PlanOperation, RecoveryPlanRun
from recovery_plans.transitions import PlanRunState
from replication.choices import Direction
from replication.choices import ProtectionState as P
from replication.choices import RecoveryPointType
from replication.choices import TestFailoverState as T
from replication.models import ProtectedItem, RecoveryPoint
from replication.services import protected_item_test_failover_transition, protected_item_transition
from vault.models import NetworkPurpose, RecoveryNetwork
from vault.services import event_record

# How the recovery point is chosen. Every recovery point is processed when it is cut (the
# replica disks are snapshotted at that moment), so "latest_processed" is the same point as
# "latest": the newest one. ASR's names are kept so that scripts written for it work.
POINT_CHOICES = ("latest", "latest_processed", "latest_app_consistent", "custom")
POINT_HELP = (
    "latest: the newest recovery point; latest_processed: the same (every point is processed when it is cut); "
    "latest_app_consistent: the newest app-consistent point; custom: the point named by recoveryPointId."
)

# Test failover runs while replication goes on (the list lives next to its choices).
TEST_FAILOVER_STATES = P.TEST_FAILOVER_ALLOWED
# Jobs that work on a failed-over VM: only one at a time per item.
FAILED_OVER_JOBS = (JobType.APPLY_RECOVERY_POINT, JobType.FAILOVER_COMMIT)

TEST_FAILOVER_STEPS = ["Prepare the recovery point", "Create the test VM and verify its disks", "Check the test VM is running"]
CLEANUP_STEPS = ["Remove the test VM", "Record the cleanup"]
PLANNED_STEPS = [
    "Shut down the source VM", "Replicate the last writes", "Prepare the recovery point",
    "Create the VM and verify its disks", "Check the VM is running",
]
UNPLANNED_STEPS = ["Shut down the source VM", "Prepare the recovery point", "Create the VM and verify its disks", "Check the VM is running"]
APPLY_POINT_STEPS = ["Prepare the recovery point", "Swap the VM's disks and verify them", "Check the VM is running"]
COMMIT_STEPS = ["Commit the failover", "Release recovery points"]


# --- selectors ------------------------------------------------------------------------------


def recovered_vms_for_item(*, item: ProtectedItem) -> QuerySet:
    """Every VM recovered from the item, newest first (current ones have no ``removed_at``)."""
    return RecoveredVm.objects.filter(item=item).select_related("site", "network").order_by("-created_at")


def current_recovered_vm(*, item: ProtectedItem, kind: str) -> RecoveredVm | None:
    return RecoveredVm.objects.filter(item=item, kind=kind, removed_at__isnull=True).select_related("site", "network").first()


def recovery_point_choose(*, item: ProtectedItem, point: str, recovery_point_id=None) -> RecoveryPoint:
    """The recovery point ``point`` names for the item; ``ValidationFailed`` with a sentence otherwise."""
    if point not in POINT_CHOICES:
        raise ValidationFailed(
            f"'{point}' is not a way to choose a recovery point; use one of {', '.join(POINT_CHOICES)}.",
            extra={"fields": {"recoveryPoint": [f"one of {', '.join(POINT_CHOICES)}"]}},
        )
    points = RecoveryPoint.objects.filter(item=item)
    if point == "custom":
        if not recovery_point_id:
            raise ValidationFailed(
                "A custom recovery point needs recoveryPointId: the id of one of the item's recovery points.",
                extra={"fields": {"recoveryPointId": ["required for a custom recovery point"]}},
            )
        chosen = None
        try:
            chosen = points.filter(pk=uuid.UUID(str(recovery_point_id))).first()
        except ValueError:
            pass
        if chosen is None:
            chosen = points.filter(point_id=str(recovery_point_id)).first()
        if chosen is None:
            raise ValidationFailed(
                f"'{item.name}' has no recovery point {recovery_point_id} (it may have been pruned by retention).",
                extra={"fields": {"recoveryPointId": ["not a recovery point of this item"]}},
            )
        return chosen
    if point == "latest_app_consistent":
        chosen = points.filter(type=RecoveryPointType.APP_CONSISTENT).order_by("-seq").first()
        if chosen is None:
            raise ValidationFailed(
                f"'{item.name}' has no app-consistent recovery point yet. Choose the latest point, or wait for the "
                "policy's next app-consistent snapshot.",
                extra={"fields": {"recoveryPoint": ["no app-consistent recovery point"]}},
            )
        return chosen
    # A point that is not crash-consistent (a disk scanned without a frozen view) is never the default.
    chosen = points.exclude(type=RecoveryPointType.NOT_CRASH_CONSISTENT).order_by("-seq").first()
    if chosen is None and points.exists():
        raise ValidationFailed(
            f"'{item.name}' has only recovery points that are not crash-consistent (its disks are scanned without a "
            "frozen view). Choose one of them as a custom point if you accept that.",
            extra={"fields": {"recoveryPoint": ["no crash-consistent recovery point"]}},
        )
    if chosen is None:
        raise ValidationFailed(
            f"'{item.name}' has no recovery point yet: the first one is cut when initial replication completes.",
            extra={"fields": {"recoveryPoint": ["no recovery point"]}},
        )
    return chosen


def recovery_network_choose(*, item: ProtectedItem, network=None, purpose: str) -> RecoveryNetwork:
    """The network a recovered VM of the item goes on: ``network`` (an instance, id or name)
    if given, else the item's mapped network, else the site's first network of ``purpose``."""
    site = item.recovery_site
    if site is None:
        raise ValidationFailed(
            f"'{item.name}' has no recovery site. Choose one for it (recovery_site) before recovering it.",
            extra={"fields": {"recovery_site": ["required"]}},
        )
    what = NetworkPurpose(purpose).label.lower()
    if network in (None, ""):
        mapped = item.test_network if purpose == NetworkPurpose.TEST else item.recovery_network
        chosen = mapped or site.networks.filter(purpose=purpose).order_by("name").first()
        if chosen is None:
            raise ValidationFailed(f"The recovery site {site.name} has no {what}; add one to it first.")
        return chosen
    if isinstance(network, RecoveryNetwork):
        chosen = network if network.site_id == site.pk else None
        label = network.name
    else:
        label = str(network)
        chosen = None
        if label.isdigit():
            chosen = site.networks.filter(pk=int(label)).first()
        if chosen is None:
            chosen = site.networks.filter(name=label).first()
    if chosen is None:
        raise ValidationFailed(
            f"'{label}' is not a network of the recovery site {site.name}.",
            extra={"fields": {"network": ["not a network of the item's recovery site"]}},
        )
    if chosen.purpose != purpose:
        raise ValidationFailed(
            f"'{chosen.name}' is {_a(chosen.get_purpose_display().lower())}; this operation needs {_a(what)}.",
            extra={"fields": {"network": [f"not a {what}"]}},
        )
    return chosen


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _point_params(point: RecoveryPoint, choice: str) -> dict:
    return {"point_id": point.point_id, "point_choice": choice}


def _job(*, item: ProtectedItem, job_type: str, steps: list[str], params: dict, user) -> Job:
    return job_create(
        job_type=job_type, vault=item.vault, target_type="protected_item", target_id=str(item.pk),
        target_name=item.name, params=params, steps=steps, created_by=user,
    )


def _forward_only(item: ProtectedItem, operation: str) -> None:
    """A returning replication (failback, recovery to primary) is failed over from its
    failback, never recovered to a recovery site."""
    if item.direction == Direction.RECOVERY_TO_PRIMARY:
        raise ValidationFailed(
            f"'{item.name}' replicates back to on-premises (failback): it cannot {operation}. Fail it over to "
            "on-premises from the item that failed over (plannedFailover, unplannedFailover or failBack).")


def _locked(item: ProtectedItem) -> ProtectedItem:
    return ProtectedItem.objects.select_for_update(of=("self",)).select_related("vault", "recovery_site").get(pk=item.pk)


# --- test failover --------------------------------------------------------------------------


def protected_item_test_failover(*, item: ProtectedItem, point: str, recovery_point_id=None, network=None, user=None):
    """A DR drill: a copy of the VM from the chosen point, in the isolated test network;
    replication goes on untouched."""
    _forward_only(item, "test failover")
    item = ProtectedItem.objects.select_related("vault", "recovery_site").get(pk=item.pk)
    if item.protection_state not in TEST_FAILOVER_STATES:
        raise InvalidTransition(
            f"Cannot test failover '{item.name}' while it is {item.get_protection_state_display().lower()}.",
            current_state=item.protection_state, operation="test failover",
        )
    if item.test_failover_state != T.NONE:
        raise InvalidTransition(
            f"Cannot test failover '{item.name}' now: {item.get_test_failover_state_display().lower()}.",
            current_state=item.test_failover_state, operation="test failover",
        )
    chosen_network = recovery_network_choose(item=item, network=network, purpose=NetworkPurpose.TEST)
    chosen = recovery_point_choose(item=item, point=point, recovery_point_id=recovery_point_id)
    with transaction.atomic():
        locked = _locked(item)
        if locked.protection_state not in TEST_FAILOVER_STATES:
            raise InvalidTransition(
                f"Cannot test failover '{item.name}' while it is {locked.get_protection_state_display().lower()}.",
                current_state=locked.protection_state, operation="test failover",
            )
        item = protected_item_test_failover_transition(item_id=item.pk, to_state=T.IN_PROGRESS, operation="test failover")
        job = _job(item=item, job_type=JobType.TEST_FAILOVER, steps=TEST_FAILOVER_STEPS, user=user,
                   params={**_point_params(chosen, point), "network_id": chosen_network.pk})
        event_record(vault=item.vault, kind="test_failover", protected_item=item, job=job,
                     message=f"Test failover of {item.name} to the point of {chosen.time:%Y-%m-%d %H:%M:%S} "
                             f"({chosen.get_type_display().lower()}) on {chosen_network.name}.")
    return item, job


def protected_item_test_failover_cleanup(*, item: ProtectedItem, notes: str = "", user=None):
    """Remove the test VM and its disks, and record the admin's notes on the drill."""
    notes = (notes or "").strip()
    if len(notes) > 4000:
        raise ValidationFailed("The notes are longer than 4000 characters.", extra={"fields": {"comments": ["too long"]}})
    with transaction.atomic():
        item = protected_item_test_failover_transition(item_id=item.pk, to_state=T.CLEANING_UP, operation="clean up the test failover of")
        job = _job(item=item, job_type=JobType.TEST_FAILOVER_CLEANUP, steps=CLEANUP_STEPS, user=user, params={"notes": notes})
    return item, job


# --- failover -------------------------------------------------------------------------------


def protected_item_planned_failover(*, item: ProtectedItem, network=None, user=None):
    """Shut the source down, replicate its last writes and recover from a point after them:
    no data is lost."""
    _forward_only(item, "fail over to a recovery site")
    item = ProtectedItem.objects.select_related("vault", "recovery_site", "machine").get(pk=item.pk)
    if item.protection_state != P.PROTECTED:
        raise InvalidTransition(
            f"Cannot fail over '{item.name}' while it is {item.get_protection_state_display().lower()}.",
            current_state=item.protection_state, operation="planned failover",
        )
    chosen_network = recovery_network_choose(item=item, network=network, purpose=NetworkPurpose.RECOVERY)
    if item.machine.vcenter_id is None:
        raise ValidationFailed(
            f"A planned failover shuts '{item.name}' down through its vCenter, and this machine was registered by its "
            "agent without one. Shut it down yourself and use an unplanned failover to the latest point."
        )
    with transaction.atomic():
        item = protected_item_transition(
            item_id=item.pk, to_state=P.FAILOVER_IN_PROGRESS, operation="fail over", from_states={P.PROTECTED}, last_error="",
        )
        job = _job(item=item, job_type=JobType.PLANNED_FAILOVER, steps=PLANNED_STEPS, user=user,
                   params={"network_id": chosen_network.pk, "shut_down_source": True})
        event_record(vault=item.vault, kind="failover", protected_item=item, job=job,
                     message=f"Planned failover of {item.name} to {item.recovery_site.name} ({chosen_network.name}).")
    return item, job


def protected_item_unplanned_failover(
    *, item: ProtectedItem, point: str, recovery_point_id=None, shut_down_source: bool = True, network=None, user=None
):
    """Recover from the chosen point (the source is assumed lost; it is shut down first if
    asked and reachable)."""
    _forward_only(item, "fail over to a recovery site")
    item = ProtectedItem.objects.select_related("vault", "recovery_site").get(pk=item.pk)
    if item.protection_state != P.PROTECTED:
        raise InvalidTransition(
            f"Cannot fail over '{item.name}' while it is {item.get_protection_state_display().lower()}.",
            current_state=item.protection_state, operation="unplanned failover",
        )
    chosen_network = recovery_network_choose(item=item, network=network, purpose=NetworkPurpose.RECOVERY)
    chosen = recovery_point_choose(item=item, point=point, recovery_point_id=recovery_point_id)
    with transaction.atomic():
        item = protected_item_transition(
            item_id=item.pk, to_state=P.FAILOVER_IN_PROGRESS, operation="fail over", from_states={P.PROTECTED}, last_error="",
        )
        job = _job(item=item, job_type=JobType.UNPLANNED_FAILOVER, steps=UNPLANNED_STEPS, user=user,
                   params={**_point_params(chosen, point), "network_id": chosen_network.pk, "shut_down_source": bool(shut_down_source)})
        event_record(vault=item.vault, kind="failover", protected_item=item, job=job,
                     message=f"Unplanned failover of {item.name} to the point of {chosen.time:%Y-%m-%d %H:%M:%S} "
                             f"({chosen.get_type_display().lower()}) on {chosen_network.name}.")
    return item, job


def _failed_over_job_running(item: ProtectedItem) -> Job | None:
    return Job.objects.filter(
        target_type="protected_item", target_id=str(item.pk), type__in=FAILED_OVER_JOBS, state__in=JobState.ACTIVE
    ).first()


def protected_item_apply_recovery_point(*, item: ProtectedItem, point: str, recovery_point_id=None, user=None):
    """Change recovery point: swap the failed-over VM's disks to another point (before commit)."""
    _forward_only(item, "change its recovery point")
    item = ProtectedItem.objects.select_related("vault").get(pk=item.pk)
    if item.protection_state != P.FAILED_OVER:
        raise InvalidTransition(
            f"Cannot change the recovery point of '{item.name}' while it is {item.get_protection_state_display().lower()}; "
            "it must be failed over and not committed.",
            current_state=item.protection_state, operation="change recovery point",
        )
    chosen = recovery_point_choose(item=item, point=point, recovery_point_id=recovery_point_id)
    with transaction.atomic():
        locked = _locked(item)
        running = _failed_over_job_running(locked)
        if locked.protection_state != P.FAILED_OVER or running is not None:
            raise Conflict(
                f"Cannot change the recovery point of '{item.name}' now: "
                + (f"{running.get_type_display().lower()} is running." if running else
                   f"it is {locked.get_protection_state_display().lower()}."),
                code="invalid_state",
                extra={"current_state": locked.protection_state, "operation": "change recovery point",
                       **({"job": str(running.pk)} if running else {})},
            )
        vm = current_recovered_vm(item=locked, kind=RecoveredVmKind.FAILOVER)
        if vm is None:
            raise Conflict(f"'{item.name}' has no failed-over VM to change.", code="invalid_state",
                           extra={"current_state": locked.protection_state, "operation": "change recovery point"})
        job = _job(item=locked, job_type=JobType.APPLY_RECOVERY_POINT, steps=APPLY_POINT_STEPS, user=user,
                   params={**_point_params(chosen, point), "vm": vm.pk})
        event_record(vault=locked.vault, kind="apply_recovery_point", protected_item=locked, job=job,
                     message=f"Changing the recovery point of {vm.name} to {chosen.time:%Y-%m-%d %H:%M:%S} "
                             f"({chosen.get_type_display().lower()}).")
    return locked, job


def protected_item_failover_commit(*, item: ProtectedItem, user=None):
    """Make the failover final and release the recovery points no longer needed."""
    _forward_only(item, "commit a failover")
    with transaction.atomic():
        locked = _locked(item)
        running = _failed_over_job_running(locked)
        if running is not None:
            raise Conflict(
                f"Cannot commit the failover of '{locked.name}' while {running.get_type_display().lower()} is running.",
                code="invalid_state",
                extra={"current_state": locked.protection_state, "operation": "commit", "job": str(running.pk)},
            )
        item = protected_item_transition(item_id=item.pk, to_state=P.FAILOVER_COMMITTED, operation="commit the failover of",
                                         from_states={P.FAILED_OVER})
        job = _job(item=item, job_type=JobType.FAILOVER_COMMIT, steps=COMMIT_STEPS, user=user, params={})
        event_record(vault=item.vault, kind="failover_commit", protected_item=item, job=job,
                     message=f"The failover of {item.name} was committed.")
    return item, job


# --- recovery plans -------------------------------------------------------------------------
# The editor: create, rename, delete a plan; its groups (in order), their items and pre- and
# post-actions; its defaults (recovery point type, network mapping per recovery site). Every
# check runs before anything is written, so a refused edit changes nothing; edits of one plan
# are serialized by a lock on its row, so two admins cannot put one item in two groups.


def _refuse(message: str, field: str = "groups") -> ValidationFailed:
    return ValidationFailed(message, extra={"fields": {field: [message]}})


def _validated(obj, *, exclude=None, prefix: str = "") -> None:
    """``full_clean()``; the first problem becomes ``ValidationFailed`` with its sentence
    (after ``prefix``, which says what was checked)."""
    try:
        obj.full_clean(exclude=exclude, validate_unique=False, validate_constraints=False)
    except DjangoValidationError as exc:
        fields = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        field, messages = next(iter(fields.items()))
        message = messages[0] if field in ("__all__", "non_field_errors") or messages[0][-1:] != "." or \
            not messages[0].startswith("This field") else f"{field.replace('_', ' ')}: {messages[0]}"
        raise ValidationFailed(f"{prefix}{message}", extra={"fields": fields}) from None


def _plan_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise _refuse("A recovery plan needs a name.", "name")
    return name


def _name_free(*, vault, name: str, plan: RecoveryPlan | None = None) -> None:
    same = RecoveryPlan.objects.filter(vault=vault, name=name)
    if plan is not None:
        same = same.exclude(pk=plan.pk)
    if same.exists():
        raise Conflict(f"A recovery plan named '{name}' already exists in this vault.")


def _plan_point_type(value: str) -> str:
    if value not in PlanRecoveryPoint.values:
        raise _refuse(f"'{value}' is not a recovery point type of a plan; use one of "
                      f"{', '.join(PlanRecoveryPoint.values)}.", "recovery_point_type")
    return value


def _item_in_vault(*, vault, item: ProtectedItem) -> None:
    if item.vault_id != vault.pk:
        raise _refuse(f"'{item.name}' belongs to another vault; a plan holds only items of its own vault.")
    if item.direction == Direction.RECOVERY_TO_PRIMARY:
        raise _refuse(f"'{item.name}' is a replication back to on-premises (failback); a plan holds the items that fail "
                      "over to the recovery site.")


def _actions(group_name: str, actions: list[dict]) -> list[RecoveryPlanAction]:
    """Unsaved, checked actions of one group, numbered 1.. per phase in the order given."""
    built, next_order = [], {ActionPhase.PRE: 0, ActionPhase.POST: 0}
    for spec in sorted(actions, key=lambda a: a.get("order") or 0):
        spec = dict(spec)
        spec.pop("order", None)
        phase = spec.get("phase")
        if phase not in next_order:
            raise _refuse(f"An action of {group_name} must run before (PRE) or after (POST) the group.", "actions")
        name = (spec.get("name") or "").strip()
        if not name:
            raise _refuse(f"Every action of {group_name} needs a name.", "actions")
        next_order[phase] += 1
        action = RecoveryPlanAction(order=next_order[phase], **{**spec, "name": name})
        if action.kind == ActionKind.SCRIPT:
            action.instructions = ""
        elif action.kind == ActionKind.MANUAL:
            action.script = ""
        _validated(action, exclude=["group"], prefix=f"'{name}' in {group_name}: ")
        built.append(action)
    return built


def _checked_groups(*, vault, groups: list[dict]) -> list[tuple[dict, list, list[RecoveryPlanAction]]]:
    """Every group's fields, items and actions, checked as a whole: each item of this vault,
    in one group only, and at least one item in the plan."""
    orders = [g["order"] for g in groups if g.get("order") is not None]
    if len(orders) != len(set(orders)):
        raise _refuse("Each group needs its own order number.")
    ordered = sorted(enumerate(groups), key=lambda pair: (pair[1].get("order") or pair[0] + 1, pair[0]))
    seen: dict = {}
    positions: dict = {}
    checked = []
    for position, (_index, spec) in enumerate(ordered, start=1):
        name = (spec.get("name") or "").strip()
        label = name or f"Group {position}"
        if len(name) > 120:
            raise _refuse(f"The name of {label[:40]}... is longer than 120 characters.")
        items = list(spec.get("items") or [])
        for item in items:
            _item_in_vault(vault=vault, item=item)
            if item.pk in seen:
                where = "twice in that group" if seen[item.pk] == label else f"both in {seen[item.pk]} and in {label}"
                raise _refuse(f"'{item.name}' is in more than one group ({where}); an item fails over once per plan.")
            seen[item.pk] = label
            positions[item.pk] = (position, label)
        checked.append(({"order": position, "name": name}, items, _actions(label, spec.get("actions") or [])))
    if not seen:
        raise _refuse("A recovery plan needs at least one protected item: add items to its first group.")
    _replication_groups_together(positions)
    return checked


def _replication_groups_together(placement: dict) -> None:
    """The members of a replication group that are in the plan are in one group of it: they
    fail over together, to one shared recovery point. ``placement``: item pk -> plan group
    (a RecoveryPlanGroup, or (position, label) of one being written)."""
    rows = (ProtectedItem.objects.filter(pk__in=list(placement), replication_group__isnull=False)
            .order_by("name").values_list("pk", "name", "replication_group__name"))
    where: dict[str, list[tuple[str, object]]] = {}
    for pk, name, group in rows:
        where.setdefault(group, []).append((name, placement[pk]))
    for group, members in sorted(where.items()):
        if len({g if isinstance(g, tuple) else g.pk for _n, g in members}) > 1:
            spread = ", ".join(f"'{n}' in {g[1] if isinstance(g, tuple) else g}" for n, g in members)
            raise _refuse(f"The members of the replication group {group} must be in one group of the plan (they fail "
                          f"over together, to one shared recovery point): {spread}.", "items")


def _checked_mappings(*, plan: RecoveryPlan, mappings: list[dict]) -> list[RecoveryPlanNetworkMapping]:
    built, sites = [], set()
    for spec in mappings:
        mapping = RecoveryPlanNetworkMapping(plan=plan, **spec)
        if mapping.site_id in sites:
            raise _refuse(f"The recovery site {mapping.site.name} is mapped twice; give it one mapping.", "network_mappings")
        sites.add(mapping.site_id)
        _validated(mapping, exclude=["plan"])
        built.append(mapping)
    return built


def _write_groups(plan: RecoveryPlan, checked) -> None:
    plan.groups.all().delete()
    for fields, items, actions in checked:
        group = RecoveryPlanGroup.objects.create(plan=plan, **fields)
        group.items.set(items)
        for action in actions:
            action.group = group
        RecoveryPlanAction.objects.bulk_create(actions)


def _write_mappings(plan: RecoveryPlan, mappings: list[RecoveryPlanNetworkMapping]) -> None:
    plan.network_mappings.all().delete()
    for mapping in mappings:
        mapping.plan = plan
    RecoveryPlanNetworkMapping.objects.bulk_create(mappings)


def _locked_plan(plan: RecoveryPlan) -> RecoveryPlan:
    return RecoveryPlan.objects.select_for_update().select_related("vault").get(pk=plan.pk)


def recovery_plan_create(
    *, vault, name: str, groups: list[dict], description: str = "",
    recovery_point_type: str = PlanRecoveryPoint.LATEST, network_mappings: list[dict] = (), user=None,
) -> RecoveryPlan:
    """A plan of ordered groups. ``groups``: ``[{"name", "order"?, "items": [ProtectedItem],
    "actions": [{"phase", "kind", "name", "script", "timeout_seconds", "instructions"}]}]``;
    ``network_mappings``: ``[{"site", "recovery_network", "test_network"}]``."""
    plan = RecoveryPlan(vault=vault, name=_plan_name(name), description=description or "",
                        recovery_point_type=_plan_point_type(recovery_point_type))
    _validated(plan, exclude=["vault"])
    checked = _checked_groups(vault=vault, groups=groups)
    mappings = _checked_mappings(plan=plan, mappings=list(network_mappings))
    _name_free(vault=vault, name=plan.name)
    try:
        with transaction.atomic():
            plan.save()
            _write_groups(plan, checked)
            _write_mappings(plan, mappings)
            event_record(vault=vault, kind="recovery_plan", message=f"Recovery plan {plan.name} created.")
    except IntegrityError:
        raise Conflict(f"A recovery plan named '{plan.name}' already exists in this vault.") from None
    return plan


def recovery_plan_update(
    *, plan: RecoveryPlan, name: str | None = None, description: str | None = None,
    recovery_point_type: str | None = None, groups: list[dict] | None = None, network_mappings: list[dict] | None = None,
) -> RecoveryPlan:
    """Rename the plan, change its defaults, or replace its groups and network mappings
    (each only when given)."""
    with transaction.atomic():
        plan = _locked_plan(plan)
        if name is not None:
            plan.name = _plan_name(name)
        if description is not None:
            plan.description = description
        if recovery_point_type is not None:
            plan.recovery_point_type = _plan_point_type(recovery_point_type)
        _validated(plan, exclude=["vault"])
        checked = _checked_groups(vault=plan.vault, groups=groups) if groups is not None else None
        mappings = _checked_mappings(plan=plan, mappings=network_mappings) if network_mappings is not None else None
        _name_free(vault=plan.vault, name=plan.name, plan=plan)
        plan.save()
        if checked is not None:
            _write_groups(plan, checked)
        if mappings is not None:
            _write_mappings(plan, mappings)
    return plan


def recovery_plan_delete(*, plan: RecoveryPlan) -> None:
    """Delete the plan, its groups and actions; its items stay protected."""
    with transaction.atomic():
        plan = _locked_plan(plan)
        event_record(vault=plan.vault, kind="recovery_plan", message=f"Recovery plan {plan.name} deleted.")
        plan.delete()


def recovery_plan_group_add(*, plan: RecoveryPlan, name: str = "") -> RecoveryPlanGroup:
    """A new, empty group after the plan's last one."""
    name = (name or "").strip()
    with transaction.atomic():
        plan = _locked_plan(plan)
        last = plan.groups.order_by("-order").values_list("order", flat=True).first() or 0
        group = RecoveryPlanGroup(plan=plan, order=last + 1, name=name)
        _validated(group, exclude=["plan"])
        group.save()
    return group


def recovery_plan_group_rename(*, group: RecoveryPlanGroup, name: str) -> RecoveryPlanGroup:
    with transaction.atomic():
        _locked_plan(group.plan)
        group = RecoveryPlanGroup.objects.get(pk=group.pk)
        group.name = (name or "").strip()
        _validated(group, exclude=["plan"])
        group.save(update_fields=["name"])
    return group


def recovery_plan_group_remove(*, group: RecoveryPlanGroup) -> None:
    """Remove an empty group; the groups after it move up."""
    with transaction.atomic():
        plan = _locked_plan(group.plan)
        group = RecoveryPlanGroup.objects.get(pk=group.pk)
        count = group.items.count()
        if count:
            raise _refuse(f"{group} still holds {count} item{'s' if count != 1 else ''}; move or remove "
                          f"{'them' if count != 1 else 'it'} first.")
        group.delete()
        _renumber_groups(plan)


def _renumber_groups(plan: RecoveryPlan, ordered: list[RecoveryPlanGroup] | None = None) -> None:
    """Number the plan's groups 1.. in ``ordered`` order (their current order by default);
    through numbers above the current ones, so that the unique order never clashes."""
    ordered = ordered if ordered is not None else list(plan.groups.order_by("order"))
    top = max((g.order for g in ordered), default=0)
    for step in (top, 0):
        for position, group in enumerate(ordered, start=1):
            group.order = step + position
            RecoveryPlanGroup.objects.filter(pk=group.pk).update(order=group.order)


def recovery_plan_group_move(*, group: RecoveryPlanGroup, position: int) -> RecoveryPlanGroup:
    """Move the group to ``position`` (1 = first); the others keep their relative order."""
    with transaction.atomic():
        plan = _locked_plan(group.plan)
        ordered = list(plan.groups.order_by("order"))
        if not 1 <= position <= len(ordered):
            raise _refuse(f"There is no position {position} in a plan of {len(ordered)} group"
                          f"{'s' if len(ordered) != 1 else ''}.")
        moving = next(g for g in ordered if g.pk == group.pk)
        ordered.remove(moving)
        ordered.insert(position - 1, moving)
        _renumber_groups(plan, ordered)
    return moving


def recovery_plan_items_add(*, group: RecoveryPlanGroup, items: list[ProtectedItem]) -> RecoveryPlanGroup:
    """Add items of the plan's vault that are in none of its groups yet."""
    if not items:
        raise _refuse("Choose at least one protected item to add.", "items")
    with transaction.atomic():
        plan = _locked_plan(group.plan)
        group = RecoveryPlanGroup.objects.get(pk=group.pk)
        placed = {i.pk: g for g in plan.groups.prefetch_related("items") for i in g.items.all()}
        for item in items:
            _item_in_vault(vault=plan.vault, item=item)
            if item.pk in placed:
                raise _refuse(f"'{item.name}' is already in {placed[item.pk]} of this plan; move it instead of "
                              "adding it twice.", "items")
        _replication_groups_together({**placed, **{i.pk: group for i in items}})
        group.items.add(*items)
    return group


def recovery_plan_item_move(*, plan: RecoveryPlan, item: ProtectedItem, group: RecoveryPlanGroup) -> RecoveryPlanGroup:
    """Move an item of the plan into another of its groups."""
    with transaction.atomic():
        plan = _locked_plan(plan)
        if group.plan_id != plan.pk:
            raise _refuse(f"{group} is not a group of the plan {plan.name}.")
        current = plan.groups.filter(items=item).first()
        if current is None:
            raise _refuse(f"'{item.name}' is not in the plan {plan.name}.", "items")
        if current.pk != group.pk:
            placed = {i.pk: g for g in plan.groups.prefetch_related("items") for i in g.items.all()}
            _replication_groups_together({**placed, item.pk: group})
            current.items.remove(item)
            group.items.add(item)
    return group


def recovery_plan_item_remove(*, plan: RecoveryPlan, item: ProtectedItem) -> None:
    """Take an item out of the plan (it stays protected); a plan keeps at least one item."""
    with transaction.atomic():
        plan = _locked_plan(plan)
        current = plan.groups.filter(items=item).first()
        if current is None:
            raise _refuse(f"'{item.name}' is not in the plan {plan.name}.", "items")
        if RecoveryPlanGroup.items.through.objects.filter(recoveryplangroup__plan=plan).count() == 1:
            raise _refuse(f"'{item.name}' is the plan's only item and a plan needs at least one; delete the plan "
                          "instead.", "items")
        current.items.remove(item)


def recovery_plan_action_add(
    *, group: RecoveryPlanGroup, phase: str, kind: str, name: str, script: str = "",
    timeout_seconds: int = SCRIPT_TIMEOUT_DEFAULT_SECONDS, instructions: str = "",
) -> RecoveryPlanAction:
    """A pre- or post-action of the group, after the ones of its phase."""
    with transaction.atomic():
        _locked_plan(group.plan)
        group = RecoveryPlanGroup.objects.get(pk=group.pk)
        (action,) = _actions(str(group), [{
            "phase": phase, "kind": kind, "name": (name or "").strip(), "script": (script or "").strip(),
            "timeout_seconds": timeout_seconds, "instructions": (instructions or "").strip(),
        }])
        action.group = group
        action.order = (group.actions.filter(phase=phase).order_by("-order").values_list("order", flat=True).first() or 0) + 1
        action.save()
    return action


def recovery_plan_action_remove(*, action: RecoveryPlanAction) -> None:
    with transaction.atomic():
        _locked_plan(action.group.plan)
        action.delete()


# --- recovery plan selectors ----------------------------------------------------------------


def recovery_plans_for_vault(*, vault=None) -> QuerySet:
    """Plans with everything their page and their state need, in a fixed number of queries."""
    app_point = RecoveryPoint.objects.filter(item=OuterRef("pk"), type=RecoveryPointType.APP_CONSISTENT)
    items = ProtectedItem.objects.select_related("recovery_site", "recovery_network", "test_network").annotate(
        has_app_consistent_point=Exists(app_point)
    ).prefetch_related("recovery_site__networks")
    plans = RecoveryPlan.objects.select_related("vault").prefetch_related(
        Prefetch("groups", queryset=RecoveryPlanGroup.objects.order_by("order").prefetch_related(
            Prefetch("items", queryset=items), "actions")),
        Prefetch("network_mappings", queryset=RecoveryPlanNetworkMapping.objects.select_related(
            "site", "recovery_network", "test_network")),
        Prefetch("runs", queryset=RecoveryPlanRun.objects.filter(state__in=PlanRunState.ACTIVE), to_attr="active_runs"),
    )
    return plans.filter(vault=vault) if vault is not None else plans


FAILING_OVER_STATES = (P.FAILOVER_IN_PROGRESS, P.FAILED_OVER, P.FAILOVER_COMMITTED)


@dataclass(frozen=True)
class PlanItemReadiness:
    item: ProtectedItem
    group: RecoveryPlanGroup
    recovery_network: RecoveryNetwork | None
    test_network: RecoveryNetwork | None
    problems: list[str]


@dataclass(frozen=True)
class PlanStatus:
    state: str
    label: str
    problems: list[str]
    items: list[PlanItemReadiness]

    @property
    def in_progress(self) -> bool:
        return self.state in PlanState.IN_PROGRESS


def _site_network(item: ProtectedItem, mapping, purpose: str) -> RecoveryNetwork | None:
    """The network a plan run would use for the item: the plan's mapping for its site, else
    the item's own mapping, else the site's first network of the purpose."""
    field = "test_network" if purpose == NetworkPurpose.TEST else "recovery_network"
    chosen = getattr(mapping, field, None) if mapping is not None else None
    chosen = chosen or getattr(item, field)
    if chosen is None and item.recovery_site is not None:
        chosen = min((n for n in item.recovery_site.networks.all() if n.purpose == purpose), key=lambda n: n.name,
                     default=None)
    return chosen


def recovery_plan_status(*, plan: RecoveryPlan) -> PlanStatus:
    """The plan's state as a whole, and what stops each item from failing over.

    Use a plan from ``recovery_plans_for_vault()``: this reads only what it prefetched.
    """
    mappings = {m.site_id: m for m in plan.network_mappings.all()}
    readiness, states, tests = [], [], []
    for group in plan.groups.all():
        for item in group.items.all():
            mapping = mappings.get(item.recovery_site_id)
            recovery, test = (_site_network(item, mapping, p) for p in (NetworkPurpose.RECOVERY, NetworkPurpose.TEST))
            problems = []
            # Failing over or failed over is the plan's state (below), not a problem of the item.
            if item.protection_state not in (P.PROTECTED, *FAILING_OVER_STATES):
                problems.append(f"{item.name} is {item.get_protection_state_display().lower()}.")
            if item.recovery_site is None:
                problems.append(f"{item.name} has no recovery site.")
            else:
                if recovery is None:
                    problems.append(f"The recovery site {item.recovery_site.name} has no recovery network for {item.name}.")
                if test is None:
                    problems.append(f"The recovery site {item.recovery_site.name} has no test network for {item.name}.")
            if item.last_recovery_point_at is None and item.protection_state in P.REPLICATING:
                problems.append(f"{item.name} has no recovery point yet.")
            elif (plan.recovery_point_type == PlanRecoveryPoint.LATEST_APP_CONSISTENT
                  and not getattr(item, "has_app_consistent_point", True) and item.protection_state in P.REPLICATING):
                problems.append(f"{item.name} has no app-consistent recovery point yet.")
            readiness.append(PlanItemReadiness(item, group, recovery, test, problems))
            states.append(item.protection_state)
            tests.append(item.test_failover_state)
    problems = [p for r in readiness for p in r.problems]
    if not readiness:
        state = PlanState.EMPTY
    elif P.FAILOVER_IN_PROGRESS in states:
        state = PlanState.FAILOVER_IN_PROGRESS
    elif T.IN_PROGRESS in tests or T.CLEANING_UP in tests:
        state = PlanState.TEST_FAILOVER_IN_PROGRESS
    elif all(s == P.FAILOVER_COMMITTED for s in states):
        state = PlanState.FAILOVER_COMMITTED
    elif all(s in (P.FAILED_OVER, P.FAILOVER_COMMITTED) for s in states):
        state = PlanState.FAILED_OVER
    elif any(s in (P.FAILED_OVER, P.FAILOVER_COMMITTED) for s in states):
        state = PlanState.PARTIALLY_FAILED_OVER
    elif T.SUCCEEDED in tests:
        state = PlanState.TEST_FAILOVER_CLEANUP_PENDING
    else:
        state = PlanState.NOT_READY if problems else PlanState.READY
    # A run between its items (a group done, the next one not started, or paused at a manual
    # action) is in progress although no item is busy at that moment.
    active_runs = getattr(plan, "active_runs", None)
    if active_runs is None:
        active_runs = list(plan.runs.filter(state__in=PlanRunState.ACTIVE))
    if active_runs and state not in PlanState.IN_PROGRESS:
        testing = active_runs[0].operation in (PlanOperation.TEST_FAILOVER, PlanOperation.TEST_FAILOVER_CLEANUP)
        state = PlanState.TEST_FAILOVER_IN_PROGRESS if testing else PlanState.FAILOVER_IN_PROGRESS
    return PlanStatus(state=state, label=PlanState(state).label, problems=problems, items=readiness)
