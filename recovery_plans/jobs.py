"""Job handlers of recovery: test failover and cleanup, planned and unplanned failover,
change recovery point, commit.

Every recovered disk is built at the recovery site from the replica's snapshot at the
chosen point and read back there; its digest must equal the replica's digest at that point
(``point_disk_digests``) before the VM is reported running. A job that fails puts the item
back where an admin can act (a failed failover: PROTECTED; a failed test failover: no test
failover) after removing the VM it made, and says both in its error.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from contextlib import contextmanager

from django.conf import settings
from django.utils import timezone

from core import queues
from core.choices import JobType
from core.exceptions import InvalidTransition, LifeboatError
from core.jobs import JobCancelled, JobContext, JobLost, JobWaiting, job_handler
from core.models import Job
from core.text import size_text
from mobility.filter import last_seq
from recovery_plans.models import RecoveredVm, RecoveredVmKind
from replication.choices import ProtectionState as P
from replication.choices import RecoveryPointType
from replication.choices import TestFailoverState as T
from replication.dataplane.apply import PointNotFound
from replication.dataplane.recovery import VerificationFailed, point_disk_digests, recovery_disks
from replication.engine import applier_for, ns_to_dt, points_mirror
from replication.lease import ApplyLease, apply_lease_take
from replication.models import ProtectedItem
from replication.services import protected_item_test_failover_transition, protected_item_transition
from replication.waits import item_wait_key, machine_wait_key
from vault.choices import Severity
from vault.connectors.base import POWERED_OFF, ConnectorError, OperationFailed
from vault.discovery import connector_for
from vault.models import RecoveryNetwork
from vault.services import event_record
from vault.simulation import machine_workload

logger = logging.getLogger(__name__)

POLL = 1.0
# A planned failover's drain looks in its worker this long (the last writes usually land
# within seconds) before it gives the worker back and waits.
DRAIN_IN_WORKER_SECONDS = 5.0
# A guest shutdown that has not powered the VM off by then is followed by a power-off.
SHUTDOWN_TIMEOUT = 300
# The simulated site's writer notices a power-off within a second; a journal that has not
# moved for this long belongs to a VM that no longer writes.
JOURNAL_SETTLE_SECONDS = 2.0


def _drain_timeout() -> int:
    return settings.LIFEBOAT_FAILOVER_DRAIN_TIMEOUT


def _item(ctx: JobContext) -> ProtectedItem:
    return ProtectedItem.objects.select_related(
        "vault", "machine", "machine__vcenter", "policy", "recovery_site"
    ).prefetch_related("replica_disks").get(pk=ctx.job.target_id)


def verified_text(disks: int, size: int) -> str:
    return f"{disks} disk{'s' if disks != 1 else ''} verified, {size_text(size)}"


# --- the apply lease ------------------------------------------------------------------------


@contextmanager
def apply_lease(ctx: JobContext, item: ProtectedItem):
    """Hold the item's apply lease (the one ``replication.engine.item_apply`` takes): no apply
    pass, and so no retention pruning, runs for the item meanwhile. While an apply pass
    holds it the job waits (the pass's end wakes it)."""
    lease = apply_lease_take(item.pk)
    if lease is None:
        ctx.wait("Waiting for the apply pass under way to finish.", key=item_wait_key(item.pk), check_after=2)
    try:
        yield lease
    finally:
        lease.release()


def _apply_pass(item: ProtectedItem, lease: ApplyLease):
    """Apply what has arrived for the item and mirror its points (the caller holds the lease).

    Used while the item is failing over: the periodic apply leaves items that are not
    replicating alone, so the failover applies the last writes itself.
    """
    applier = applier_for(item)
    result = applier.apply_pending(crash_consistent_interval_s=item.policy.crash_consistent_frequency_seconds, max_batches=64)
    lease.check()
    points_mirror(item=item, points=applier.list_points())
    ProtectedItem.objects.filter(pk=item.pk).update(applied_seq=result.applied_seq)
    if result.errors:
        raise LifeboatError(f"Replication data of {item.name} was rejected and not applied: {result.errors[0]}")
    return applier, result


# --- building and removing recovered VMs ----------------------------------------------------


def _recovery_disks(item: ProtectedItem, point_id: str):
    """What each recovered disk must hold: the replica's snapshot at the point and its digest."""
    applier = applier_for(item)
    try:
        point = applier.get_point(point_id)
        disks = recovery_disks(applier, point_id, point_disk_digests(applier, point_id))
    except PointNotFound:
        raise LifeboatError(
            f"The recovery point {point_id} of {item.name} no longer exists (pruned by retention); choose a newer one."
        ) from None
    # a point has the disks the machine had then (one added or removed later is not a gap)
    expected = set(point.disk_sizes) if point.disk_sizes else {d.index for d in item.replica_disks.all()}
    missing = sorted(expected - {d.index for d in disks})
    if missing:
        raise LifeboatError(f"The recovery point {point_id} of {item.name} has no snapshot of disk(s) {missing}.")
    if not disks:
        raise LifeboatError(f"{item.name} has no replica disks to recover.")
    return point, disks


@contextmanager
def _site_errors(site_name: str, doing: str):
    """The recovery site's errors, and a failed verification, as sentences for the job."""

    try:
        yield
    except VerificationFailed as exc:
        raise LifeboatError(f"Verification failed, nothing was kept: {exc}.") from None
    except ConnectorError as exc:
        raise LifeboatError(f"The recovery site {site_name} could not {doing}: {exc}") from None


def _progress(ctx: JobContext):
    def report(message: str, fraction: float) -> None:
        ctx.progress(max(0.0, min(1.0, float(fraction))) * 100, message=message)

    return report


def _check_verified(vm_name: str, disks, info) -> tuple[list[dict], int]:
    """Each disk the site read back must carry the replica's digest at the point."""
    got = {d.index: d for d in info.disks}
    out, total = [], 0
    for disk in disks:
        back = got.get(disk.index)
        if back is None:
            raise LifeboatError(f"The recovery site did not report disk {disk.index} of {vm_name}.")
        if back.digest != disk.expected.digest:
            raise LifeboatError(
                f"Disk {disk.index} of {vm_name} does not match the replica: the site read back {back.digest}, "
                f"the recovery point holds {disk.expected.digest}."
            )
        out.append({"index": back.index, "size_bytes": back.size_bytes, "digest": back.digest, "method": back.method,
                    "location": back.location})
        total += back.size_bytes
    return out, total


def _point_fields(point) -> dict:
    return {
        "point_id": point.point_id,
        "point_time": ns_to_dt(point.source_time_ns),
        "point_type": RecoveryPointType.APP_CONSISTENT if point.kind == "app_consistent" else RecoveryPointType.CRASH_CONSISTENT,
    }


def _build_vm(ctx: JobContext, item: ProtectedItem, *, kind: str, point_id: str, network: RecoveryNetwork,
              name: str, create_step: str, check_step: str) -> tuple[RecoveredVm, dict]:
    site = item.recovery_site
    with ctx.step("Prepare the recovery point"):
        point, disks = _recovery_disks(item, point_id)
        ctx.progress(100, message=f"{len(disks)} disk{'s' if len(disks) != 1 else ''} at the point of "
                                  f"{ns_to_dt(point.source_time_ns):%Y-%m-%d %H:%M:%S} UTC")
    with ctx.step(create_step):

        # A VM recovered onto the simulated site goes on writing like its simulated source.
        workload = None
        if site.kind == "simulated":
            try:
                workload = machine_workload(machine=item.machine)
            except Exception:  # noqa: BLE001 - the source may be gone (that is why we fail over)
                workload = None
        with _site_errors(site.name, f"create {name}"), site.connector(workload=workload) as connector:
            info = connector.create_vm(
                name=name, network=network.name, disks=disks, guest_os=item.machine.guest_os or "otherGuest64",
                progress=_progress(ctx),
            )
        vm = RecoveredVm.objects.create(
            item=item, kind=kind, site=site, network=network, vm_id=info.vm_id, name=info.name,
            power_state=info.power_state, **_point_fields(point),
        )
        recorded, total = _check_verified(info.name, disks, info)
        vm.disks, vm.verified_bytes = recorded, total
        vm.save(update_fields=["disks", "verified_bytes", "updated_at"])
        ctx.progress(100, message=verified_text(len(recorded), total))
    with ctx.step(check_step):
        power_state = _running(site, vm)
        ctx.progress(100, message=f"{vm.name} is {power_state} on {network.name}; {verified_text(len(recorded), total)}.")
    return vm, {
        "vm": vm.name, "vm_id": vm.vm_id, "site": site.name, "network": network.name, "point_id": point.point_id,
        "point_time": vm.point_time.isoformat(), "point_type": vm.point_type, "disks_verified": len(recorded),
        "verified_bytes": total, "message": verified_text(len(recorded), total),
    }


def _running(site, vm: RecoveredVm) -> str:

    try:
        with site.connector() as connector:
            info = connector.get_vm(vm.vm_id)
    except ConnectorError as exc:
        raise LifeboatError(f"{vm.name} was created but the recovery site cannot report on it: {exc}") from None
    RecoveredVm.objects.filter(pk=vm.pk).update(power_state=info.power_state, updated_at=timezone.now())
    vm.power_state = info.power_state
    if info.power_state != "poweredOn":
        raise LifeboatError(f"{vm.name} was created but is {info.power_state}, not running.")
    return "running"


def _remove_vm(vm: RecoveredVm, *, notes: str) -> tuple[bool, str]:
    """Destroy a recovered VM and mark it removed; (removed, a sentence saying what happened)."""
    try:
        with vm.site.connector() as connector:
            connector.destroy_vm(vm.vm_id)
    except Exception as exc:  # noqa: BLE001 - the sentence tells the admin to do it by hand
        return False, f"The VM {vm.name} could not be removed from {vm.site.name} ({exc}); remove it there by hand."
    RecoveredVm.objects.filter(pk=vm.pk).update(removed_at=timezone.now(), cleanup_notes=notes[:4000], power_state="")
    return True, f"The VM {vm.name} was removed from {vm.site.name}."


def _current(item_id, kind: str) -> RecoveredVm | None:
    return RecoveredVm.objects.filter(item_id=item_id, kind=kind, removed_at__isnull=True).select_related("site").first()


def _failure_text(exc: BaseException) -> str:
    if isinstance(exc, LifeboatError):
        return exc.message
    text = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, (OSError, ValueError)):
        return text
    logger.exception("Recovery job failed")
    return f"Unexpected error ({exc.__class__.__name__}): {text}"


def undoes(undo):
    """Run ``undo(job, error) -> sentence`` when the handler fails, before the job turns FAILED,
    so that its error says both what went wrong and what was cleaned up. ``undo`` is also the
    job's failure hook (a cancelled or reaped job); it is idempotent and says nothing the
    second time."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(ctx: JobContext):
            try:
                return fn(ctx)
            except (JobCancelled, JobWaiting, JobLost):  # not failures: a cancel, a wait, a reaped job
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is undone and told
                message = _failure_text(exc)
                extra = undo(ctx.job, message)
                raise LifeboatError(f"{message} {extra}".strip()) from exc

        return run

    return wrap


def _hook(undo):
    """The failure hook for ``undo``: what it did the first time is already in the error."""

    def on_failure(job: Job, error: str) -> None:
        extra = undo(job, error)
        if extra and extra not in error:
            Job.objects.filter(pk=job.pk).update(error=f"{error} {extra}".strip())

    return on_failure


# --- the source VM --------------------------------------------------------------------------


def _shut_down_source(ctx: JobContext, item: ProtectedItem, *, required: bool) -> str:
    """Shut the source VM down through its vCenter (guest shutdown, else power-off)."""

    machine = item.machine
    if machine.vcenter is None:
        if required:
            raise LifeboatError(f"{machine.name} has no vCenter to shut it down through.")
        return f"{machine.name} has no vCenter; it was not shut down."
    how = ctx.memo.get("source_shutdown")  # what an earlier run of the job did
    try:
        with connector_for(machine.vcenter) as site:
            if how is None:
                vm = site.get_vm(machine.instance_uuid)
                how = "was already off"
                if vm.power_state != POWERED_OFF:
                    try:
                        site.shutdown_guest(machine.instance_uuid)
                        how = "was shut down"
                    except OperationFailed:
                        site.power_off(machine.instance_uuid)
                        how = "was powered off (its guest could not shut down)"
                ctx.memo["source_shutdown"] = how
            if site.get_vm(machine.instance_uuid).power_state != POWERED_OFF:
                if ctx.deadline_passed("source shutdown", SHUTDOWN_TIMEOUT):
                    site.power_off(machine.instance_uuid)
                    how = f"was powered off (its guest did not shut down within {SHUTDOWN_TIMEOUT // 60} minutes)"
                    ctx.memo["source_shutdown"] = how
                else:
                    ctx.wait(f"Waiting for {machine.name} to shut down.", check_after=POLL, progress=10)
    except ConnectorError as exc:
        if required:
            raise LifeboatError(f"The source VM {machine.name} could not be shut down: {exc}") from None
        return f"The source VM {machine.name} could not be reached ({exc}); the failover went on without shutting it down."
    machine.__class__.objects.filter(pk=machine.pk).update(power_state=POWERED_OFF)
    _journals_settled(ctx, item)
    return f"The source VM {machine.name} {how}."


def _journal_positions(item: ProtectedItem) -> dict[str, int]:
    """Where each locally readable write journal of the source stands (agents beside the disks)."""

    out = {}
    for d in item.replica_disks.all():
        if d.journal_dir and os.path.isdir(d.journal_dir):
            out[str(d.index)] = last_seq(d.journal_dir)
    return out


def _journals_settled(ctx: JobContext, item: ProtectedItem) -> None:
    """Wait until the source's journals stop moving: the VM's last write is journaled."""
    last = _journal_positions(item)
    if not last:
        return
    still_since = time.monotonic()
    # A short wait in the worker: the VM is off, so its journals go still within seconds.
    while time.monotonic() - still_since < JOURNAL_SETTLE_SECONDS:
        ctx.short_pause(0.25)
        now = _journal_positions(item)
        if now != last:
            last, still_since = now, time.monotonic()


# --- test failover --------------------------------------------------------------------------


def _undo_test_failover(job: Job, error: str) -> str:
    """Remove the test VM (if one was made) and end the drill; a sentence saying so."""
    item_id = job.target_id
    if not ProtectedItem.objects.filter(pk=item_id, test_failover_state=T.IN_PROGRESS).exists():
        return ""
    vm = _current(item_id, RecoveredVmKind.TEST)
    removed, cleanup = True, "No test VM was left at the recovery site."
    if vm is not None:
        removed, cleanup = _remove_vm(vm, notes=f"Removed because the test failover failed: {error}")
    # A VM that could not be removed leaves the drill pending cleanup, so the admin can retry it.
    target = T.NONE if removed else T.SUCCEEDED
    protected_item_test_failover_transition(item_id=item_id, to_state=target, operation="end the failed test failover of",
                                            from_states={T.IN_PROGRESS}, quiet=True,
                                            last_error=f"Test failover failed: {error} {cleanup}"[:2000])
    return cleanup


def test_vm_name(item: ProtectedItem) -> str:
    """A test VM's name: never the production VM's."""
    return f"{item.name}-test"


@job_handler(JobType.TEST_FAILOVER, queue=queues.CONTROL, on_failure=_hook(_undo_test_failover))
@undoes(_undo_test_failover)
def run_test_failover(ctx: JobContext) -> dict:
    item = _item(ctx)
    if item.test_failover_state != T.IN_PROGRESS:
        raise LifeboatError(f"The test failover of {item.name} is {item.get_test_failover_state_display().lower()}, not in progress.")
    network = RecoveryNetwork.objects.get(pk=ctx.params["network_id"])
    vm, result = _build_vm(
        ctx, item, kind=RecoveredVmKind.TEST, point_id=ctx.params["point_id"], network=network, name=test_vm_name(item),
        create_step="Create the test VM and verify its disks", check_step="Check the test VM is running",
    )

    protected_item_test_failover_transition(item_id=item.pk, to_state=T.SUCCEEDED, operation="finish the test failover of")
    event_record(vault=item.vault, kind="test_failover_done", protected_item=item, job=ctx.job,
                 message=f"Test failover of {item.name}: {vm.name} is running on {network.name} ({result['message']}). "
                         "Clean it up when the drill is over.")
    return result


def _undo_cleanup(job: Job, error: str) -> str:
    sentence = "The test VM is still recorded; run the cleanup again."
    protected_item_test_failover_transition(
        item_id=job.target_id, to_state=T.SUCCEEDED, operation="end the failed cleanup of", from_states={T.CLEANING_UP},
        quiet=True, last_error=f"Cleanup of the test failover failed: {error} {sentence}"[:2000],
    )
    return sentence


@job_handler(JobType.TEST_FAILOVER_CLEANUP, queue=queues.CONTROL, on_failure=_hook(_undo_cleanup))
@undoes(_undo_cleanup)
def run_test_failover_cleanup(ctx: JobContext) -> dict:

    item = _item(ctx)
    notes = ctx.params.get("notes", "")
    vm = _current(item.pk, RecoveredVmKind.TEST)
    with ctx.step("Remove the test VM"):
        if vm is not None:
            removed, sentence = _remove_vm(vm, notes=notes)
            if not removed:
                raise LifeboatError(sentence)
            ctx.progress(100, message=sentence)
    with ctx.step("Record the cleanup"):
        protected_item_test_failover_transition(item_id=item.pk, to_state=T.NONE, operation="finish the cleanup of")
        ProtectedItem.objects.filter(pk=item.pk, last_error__startswith="Test failover").update(last_error="")
        event_record(vault=item.vault, kind="test_failover_cleanup", protected_item=item, job=ctx.job,
                     message=f"Test failover of {item.name} cleaned up" + (f": {notes}" if notes else "."))
    return {"vm": vm.name if vm else None, "notes": notes}


# --- failover -------------------------------------------------------------------------------


def _undo_failover(job: Job, error: str) -> str:
    """Remove the VM the failover made and put the item back to PROTECTED; a sentence saying so."""
    item_id = job.target_id
    item = ProtectedItem.objects.filter(pk=item_id, protection_state=P.FAILOVER_IN_PROGRESS).select_related("machine").first()
    if item is None:
        return ""
    vm = _current(item_id, RecoveredVmKind.FAILOVER)
    cleanup = "No VM was left at the recovery site."
    if vm is not None:
        removed, cleanup = _remove_vm(vm, notes=f"Removed because the failover failed: {error}")
        if not removed:
            RecoveredVm.objects.filter(pk=vm.pk).update(removed_at=timezone.now(), cleanup_notes=cleanup)
    # A bookmark the failover asked for and never saw is withdrawn.
    bookmarks = [b for b in item.pending_bookmarks if not str(b.get("label", "")).startswith("planned failover")]
    source = ""
    if job.params.get("shut_down_source") and item.machine.vcenter_id:
        source = (f" The source VM {item.machine.name} may have been shut down by the failover: power it on to resume "
                  "replication from it.")
    sentence = f"{cleanup}{source} The item is protected again."
    protected_item_transition(item_id=item_id, to_state=P.PROTECTED, operation="roll back the failed failover of",
                              from_states={P.FAILOVER_IN_PROGRESS}, quiet=True,
                              last_error=f"Failover failed: {error} {sentence}"[:2000], pending_bookmarks=bookmarks)
    return sentence


def _require_failing_over(item: ProtectedItem) -> None:
    if item.protection_state != P.FAILOVER_IN_PROGRESS:
        raise LifeboatError(f"{item.name} is {item.get_protection_state_display().lower()}, not failing over.")
    if item.recovery_site is None:
        raise LifeboatError(f"{item.name} has no recovery site.")


def _finish_failover(ctx: JobContext, item: ProtectedItem, vm: RecoveredVm, result: dict, source: str) -> dict:
    try:
        protected_item_transition(item_id=item.pk, to_state=P.FAILED_OVER, operation="finish the failover of",
                                  from_states={P.FAILOVER_IN_PROGRESS}, last_error="")
    except InvalidTransition:
        raise LifeboatError(f"{item.name} left the failover before it finished.") from None
    event_record(vault=item.vault, kind="failed_over", protected_item=item, job=ctx.job,
                 message=f"{item.name} failed over: {vm.name} runs at {vm.site.name} on {vm.network.name} from the point of "
                         f"{vm.point_time:%Y-%m-%d %H:%M:%S} UTC ({result['message']}). {source}".strip())
    return {**result, "source": source}


def _request_bookmark(item: ProtectedItem) -> dict:
    now = timezone.now()
    bookmark = {"id": uuid.uuid4().hex, "label": f"planned failover {now:%Y-%m-%d %H:%M:%S}", "requested_at": now.isoformat()}
    positions = _journal_positions(item)
    if positions:
        bookmark["positions"] = positions
    item.refresh_from_db(fields=["pending_bookmarks"])
    ProtectedItem.objects.filter(pk=item.pk).update(pending_bookmarks=[*item.pending_bookmarks[-9:], bookmark])
    return bookmark


def _bookmark_point(applier, bookmark_id: str):
    for p in reversed(applier.list_points()):
        if isinstance(p.label, dict) and p.label.get("id") == bookmark_id:
            return p
    return None


def _shut_down_step(ctx: JobContext, item: ProtectedItem, *, required: bool) -> str:
    source = _shut_down_source(ctx, item, required=required)
    ctx.summary(source)
    return source


def _drain(ctx: JobContext, item: ProtectedItem) -> str:
    """Apply the source's last writes until the point cut at a bookmark after them exists;
    returns that point's id. Looks in the worker for a few seconds, then waits (the agent's
    reports wake the job)."""
    # A bookmark after the source's last write: the point cut there holds every write.
    bookmark = ctx.memo.get("bookmark") or ctx.memo.setdefault("bookmark", _request_bookmark(item))
    in_worker_until = time.monotonic() + DRAIN_IN_WORKER_SECONDS
    while True:
        with apply_lease(ctx, item) as lease:
            applier, _ = _apply_pass(item, lease)
        point = _bookmark_point(applier, bookmark["id"])
        if point is not None:
            ctx.summary(f"Every write is in the recovery point of {ns_to_dt(point.source_time_ns):%H:%M:%S} UTC (batch {point.seq}).")
            return point.point_id
        item.refresh_from_db(fields=["acked_seq", "applied_seq", "agent_backlog_bytes", "protection_state"])
        if item.protection_state != P.FAILOVER_IN_PROGRESS:
            raise LifeboatError(f"{item.name} left the failover ({item.get_protection_state_display().lower()}).")
        if ctx.deadline_passed("drain", _drain_timeout()):
            raise LifeboatError(
                f"The agent of {item.machine.name} did not send its last writes within {_drain_timeout() // 60} minutes "
                f"({item.acked_seq} batches acknowledged, {item.applied_seq} applied). If the agent runs inside the VM it "
                "stopped with it: use an unplanned failover to the latest point instead."
            )
        message = (f"Waiting for the agent's last writes: {item.acked_seq} batches acknowledged, "
                   f"{item.applied_seq} applied, {size_text(item.agent_backlog_bytes)} left at the agent.")
        if time.monotonic() < in_worker_until:
            ctx.progress(50, message=message)
            ctx.short_pause(0.5)  # seconds at most (DRAIN_IN_WORKER_SECONDS), then a wait state
            continue
        ctx.wait(message, key=machine_wait_key(item.machine_id), check_after=2, progress=50)


@job_handler(JobType.PLANNED_FAILOVER, queue=queues.CONTROL, on_failure=_hook(_undo_failover))
@undoes(_undo_failover)
def run_planned_failover(ctx: JobContext) -> dict:
    item = _item(ctx)
    _require_failing_over(item)
    network = RecoveryNetwork.objects.get(pk=ctx.params["network_id"])
    source = ctx.run_step("Shut down the source VM", _shut_down_step, ctx, item, required=True)
    point_id = ctx.run_step("Replicate the last writes", _drain, ctx, item)
    vm, result = _build_vm(
        ctx, item, kind=RecoveredVmKind.FAILOVER, point_id=point_id, network=network, name=item.name,
        create_step="Create the VM and verify its disks", check_step="Check the VM is running",
    )
    return _finish_failover(ctx, item, vm, result, source)


@job_handler(JobType.UNPLANNED_FAILOVER, queue=queues.CONTROL, on_failure=_hook(_undo_failover))
@undoes(_undo_failover)
def run_unplanned_failover(ctx: JobContext) -> dict:
    item = _item(ctx)
    _require_failing_over(item)
    network = RecoveryNetwork.objects.get(pk=ctx.params["network_id"])
    if ctx.params.get("shut_down_source"):
        source = ctx.run_step("Shut down the source VM", _shut_down_step, ctx, item, required=False)
    else:
        with ctx.step("Shut down the source VM"):
            source = f"The source VM {item.machine.name} was left as it is, as asked."
            ctx.summary(source)
    vm, result = _build_vm(
        ctx, item, kind=RecoveredVmKind.FAILOVER, point_id=ctx.params["point_id"], network=network, name=item.name,
        create_step="Create the VM and verify its disks", check_step="Check the VM is running",
    )
    return _finish_failover(ctx, item, vm, result, source)


# --- change recovery point and commit -------------------------------------------------------


def _undo_apply_point(job: Job, error: str) -> str:
    """The VM keeps its disks (the site swaps only verified ones); say what state it is in."""
    vm = _current(job.target_id, RecoveredVmKind.FAILOVER)
    state = ""
    if vm is not None:
        try:
            with vm.site.connector() as connector:
                info = connector.get_vm(vm.vm_id)
            RecoveredVm.objects.filter(pk=vm.pk).update(power_state=info.power_state)
            state = (f"{vm.name} is {info.power_state} at {vm.site.name}, with the disks of the point of "
                     f"{vm.point_time:%Y-%m-%d %H:%M:%S} UTC.")
        except Exception as exc:  # noqa: BLE001 - reported in the sentence
            state = f"The recovery site cannot report on {vm.name} ({exc})."
    if state in error:
        return state
    ProtectedItem.objects.filter(pk=job.target_id).update(
        last_error=f"Changing the recovery point failed: {error} {state} It is still failed over; try again or commit."[:2000]
    )
    return state


@job_handler(JobType.APPLY_RECOVERY_POINT, queue=queues.CONTROL, on_failure=_hook(_undo_apply_point))
@undoes(_undo_apply_point)
def run_apply_recovery_point(ctx: JobContext) -> dict:
    item = _item(ctx)
    if item.protection_state != P.FAILED_OVER:
        raise LifeboatError(f"{item.name} is {item.get_protection_state_display().lower()}, not failed over.")
    vm = RecoveredVm.objects.select_related("site", "network").get(pk=ctx.params["vm"], removed_at__isnull=True)
    with ctx.step("Prepare the recovery point"):
        point, disks = _recovery_disks(item, ctx.params["point_id"])
        ctx.progress(100, message=f"{len(disks)} disk{'s' if len(disks) != 1 else ''} at the point of "
                                  f"{ns_to_dt(point.source_time_ns):%Y-%m-%d %H:%M:%S} UTC")
    with ctx.step("Swap the VM's disks and verify them"):
        with _site_errors(vm.site.name, f"change the disks of {vm.name}"), vm.site.connector() as connector:
            info = connector.replace_disks(vm.vm_id, disks, progress=_progress(ctx))
        recorded, total = _check_verified(vm.name, disks, info)
        previous = vm.point_time
        for field, value in _point_fields(point).items():
            setattr(vm, field, value)
        vm.disks, vm.verified_bytes, vm.power_state = recorded, total, info.power_state
        vm.save(update_fields=["point_id", "point_time", "point_type", "disks", "verified_bytes", "power_state", "updated_at"])
        ctx.progress(100, message=verified_text(len(recorded), total))
    with ctx.step("Check the VM is running"):
        _running(vm.site, vm)
    ProtectedItem.objects.filter(pk=item.pk, last_error__startswith="Changing the recovery point").update(last_error="")
    message = verified_text(len(recorded), total)
    event_record(vault=item.vault, kind="recovery_point_applied", protected_item=item, job=ctx.job,
                 message=f"{vm.name} now runs from the point of {vm.point_time:%Y-%m-%d %H:%M:%S} UTC "
                         f"(was {previous:%Y-%m-%d %H:%M:%S} UTC); {message}.")
    return {"vm": vm.name, "point_id": vm.point_id, "point_time": vm.point_time.isoformat(), "point_type": vm.point_type,
            "disks_verified": len(recorded), "verified_bytes": total, "message": message}


def _undo_commit(job: Job, error: str) -> str:
    sentence = "The failover stays committed; the recovery points are kept."
    if sentence not in error:
        ProtectedItem.objects.filter(pk=job.target_id).update(
            last_error=f"Releasing recovery points after the commit failed: {error} {sentence}"[:2000]
        )
    return sentence


@job_handler(JobType.FAILOVER_COMMIT, queue=queues.CONTROL, on_failure=_hook(_undo_commit))
@undoes(_undo_commit)
def run_failover_commit(ctx: JobContext) -> dict:
    item = _item(ctx)

    def commit() -> None:
        vm = _current(item.pk, RecoveredVmKind.FAILOVER)
        if vm is None:
            raise LifeboatError(f"{item.name} has no failed-over VM.")
        ctx.summary(f"{vm.name} at {vm.site.name} is the VM now.")

    def release() -> dict:
        with apply_lease(ctx, item) as lease:
            applier = applier_for(item)
            try:
                kept = applier.get_point(vm.point_id)
            except PointNotFound:
                raise LifeboatError(f"The recovery point {vm.name} came from is no longer in the replica.") from None
            lease.check()
            released = applier.delete_points([p.point_id for p in applier.list_points() if p.point_id != kept.point_id])
            points_mirror(item=item, points=applier.list_points())
        message = (f"Released {len(released)} recovery point{'s' if len(released) != 1 else ''}; kept the one "
                   f"{vm.name} came from.")
        ctx.summary(message)
        return {"released": len(released), "kept": kept.point_id, "message": message}

    ctx.run_step("Commit the failover", commit)
    vm = _current(item.pk, RecoveredVmKind.FAILOVER)
    if vm is None:
        raise LifeboatError(f"{item.name} has no failed-over VM.")
    done = ctx.run_step("Release recovery points", release)
    released, message = done["released"], done["message"]
    kept_id = done["kept"]
    event_record(vault=item.vault, kind="failover_committed", protected_item=item, job=ctx.job, severity=Severity.INFO,
                 message=f"Failover of {item.name} committed. {message}")
    return {"vm": vm.name, "released": released, "kept": kept_id, "message": message}
