"""Services of recovery: test failover and its cleanup, planned and unplanned failover,
change recovery point and commit, for one protected item.

Each service checks its input first (nothing changes on bad input: ``ValidationFailed``),
then, in one transaction, moves the item's state with a compare-and-set (a second click
while one runs gets ``InvalidTransition`` / ``Conflict``, the API's 409) and creates the job
that does the work (``recovery_plans.jobs``). Each returns ``(item, job)``.
"""
from __future__ import annotations

import uuid

from django.db import transaction
from django.db.models import QuerySet

from core.choices import JobState, JobType
from core.exceptions import Conflict, InvalidTransition, ValidationFailed
from core.jobs import job_create
from core.models import Job
from recovery_plans.models import RecoveredVm, RecoveredVmKind
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
    chosen = points.order_by("-seq").first()
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


def _locked(item: ProtectedItem) -> ProtectedItem:
    return ProtectedItem.objects.select_for_update(of=("self",)).select_related("vault", "recovery_site").get(pk=item.pk)


# --- test failover --------------------------------------------------------------------------


def protected_item_test_failover(*, item: ProtectedItem, point: str, recovery_point_id=None, network=None, user=None):
    """A DR drill: a copy of the VM from the chosen point, in the isolated test network;
    replication goes on untouched."""
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
