"""The bridge from the portal's items to the data plane: storage, appliers, apply passes.

An apply pass for one item runs under a lease on the item's row (compare-and-set of
``apply_lease_until``), so two workers never apply one item at once, and a worker that dies
holding it only delays the next pass by the lease's length.

**Passes on upload.** Besides the beat's sweep (every few seconds, every item), a process
server tells the vault which items it has just put logs into storage for
(``processServers/<id>/uploaded``), and those items get a pass at once: the wait for the
next sweep was the largest share of a recovery point's lag (docs/BENCHMARKS.md, "RPO under
load"). A wake-up that finds the item's pass already running must not be lost, since that
pass may have listed the logs before the new one arrived: ``apply_wake`` marks the item
(``apply_again_mark``, in the shared cache) *before* it reads the lease, a pass clears the
mark right after taking the lease (before it lists logs), and after releasing the lease the
task runs again if the mark is back (``apply_again_take``). Either the waker sees the lease
free and sends a pass, or the holder sees the mark after its release.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timezone as dt_timezone

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import F
from django.utils import timezone as dj_timezone

from core.exceptions import NotFound
from core.jobs import job_wake
from mobility.logs import log_context
from replication.choices import ProtectionState as P
from replication.choices import RecoveryPointType
from replication.dataplane.apply import DiskSpec, PointNotFound, ReplicaApplier
from replication.dataplane.digests import digest_request_answer, digest_request_read
from replication.dataplane.storage import open_storage
from replication.lease import APPLY_LEASE_SECONDS, ApplyLease, apply_lease_release, apply_lease_take  # noqa: F401
from replication.models import GroupRecoveryPoint, ProtectedItem, RecoveryPoint, ReplicaDisk
from replication.services import protected_item_mark_resync_required, protected_item_transition
from replication.waits import initial_slot_wait_key, item_wait_key
from vault.choices import Severity
from vault.services import alert_raise, event_record, vault_keys

logger = logging.getLogger(__name__)

_storage_lock = threading.Lock()
_storage = None


def storage():
    """The target storage of this deployment (LIFEBOAT_STORAGE), opened once per process."""
    global _storage
    with _storage_lock:
        if _storage is None:
            _storage = open_storage(settings.LIFEBOAT_STORAGE)
        return _storage


def reset_storage() -> None:
    global _storage
    with _storage_lock:
        _storage = None


def applier_for(item: ProtectedItem) -> ReplicaApplier:
    seal_key, _ = vault_keys(vault=item.vault)
    disks = {d.index: DiskSpec(d.storage_name, d.capacity_bytes) for d in item.replica_disks.all()}
    return ReplicaApplier(storage(), key=seal_key, item_id=item.pk, disks=disks)


def ns_to_dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=dt_timezone.utc)


def item_apply(*, item_id, max_batches: int | None = 64) -> dict | None:
    """One apply pass: logs to replica, points mirrored, retention applied, state moved on.

    Returns a summary, or None when another worker holds the item's lease. Every record
    logged during the pass names the item (``item_id``, mobility/logs.py).
    """
    started = time.perf_counter()
    with log_context(item_id=item_id):
        summary = _item_apply(item_id=item_id, max_batches=max_batches)
        took = time.perf_counter() - started
        if summary is not None and took >= settings.LIFEBOAT_SLOW_APPLY_SECONDS:
            steps = summary.get("seconds", {})
            logger.warning("item %s: a slow apply pass, %.2f s (%s) for %d batch(es) and %d point(s)", item_id, took,
                           ", ".join(f"{k} {v:.2f} s" for k, v in steps.items()), summary.get("batches", 0),
                           summary.get("points", 0), extra={"item_id": str(item_id)})
    if summary and summary.get("batches"):
        logger.debug("item %s: applied %d batch(es), %d bytes of logs, through seq %d", item_id, summary["batches"],
                     summary["log_bytes"], summary["applied_seq"], extra={"item_id": str(item_id)})
    return summary


# How long a wake-up mark outlives its setter: a pass that holds the lease longer than this
# is renewing it, and the beat's sweep picks the item up after it anyway.
APPLY_AGAIN_SECONDS = 2 * APPLY_LEASE_SECONDS


def _again_key(item_id) -> str:
    return f"apply-again:{item_id}"


def apply_again_mark(item_ids) -> None:
    """Note that these items have logs a running pass may not have seen (see the module)."""
    if item_ids:
        cache.set_many({_again_key(i): 1 for i in item_ids}, timeout=APPLY_AGAIN_SECONDS)


def apply_again_take(item_id) -> bool:
    """True (and the mark gone) if the item was woken while its last pass ran."""
    return bool(cache.delete(_again_key(item_id)))


def items_to_wake(item_ids, *, process_server_id=None) -> list[str]:
    """Of these items, the ones a pass should start for now: each is marked first, then
    those whose lease is free are returned (a held lease's holder sees the mark when it
    releases it). Items not replicating, or (given ``process_server_id``) served by another
    process server, are left out. One query."""
    ids = [str(i) for i in item_ids]
    if not ids:
        return []
    apply_again_mark(ids)
    items = ProtectedItem.objects.filter(pk__in=ids, protection_state__in=P.REPLICATING)
    if process_server_id is not None:
        items = items.filter(process_server_id=process_server_id)
    return [str(pk) for pk in items.exclude(apply_lease_until__gt=dj_timezone.now()).values_list("pk", flat=True)]


def _item_apply(*, item_id, max_batches: int | None) -> dict | None:
    lease = apply_lease_take(item_id)
    if lease is None:
        return None
    # Logs uploaded from here on are either listed by this pass or wake it again.
    apply_again_take(item_id)
    # Where a pass's time goes, step by step (logged for a slow pass, LIFEBOAT_SLOW_APPLY_SECONDS).
    seconds: dict[str, float] = {}
    mark = time.perf_counter()

    def step(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - mark
        mark = now

    try:
        item = ProtectedItem.objects.select_related("vault", "policy").prefetch_related("replica_disks").get(pk=item_id)
        if item.protection_state not in P.REPLICATING or not item.replica_disks.all():
            return {"skipped": item.protection_state}
        applier = applier_for(item)
        step("load")
        result = applier.apply_pending(
            crash_consistent_interval_s=item.policy.crash_consistent_frequency_seconds, max_batches=max_batches,
            gap_grace_s=float(getattr(settings, "LIFEBOAT_LOG_GAP_GRACE_SECONDS", 120)),
        )
        step("apply")
        lease.check()  # a holder that lost its lease writes nothing more (replication/lease.py)
        retention_ns = item.policy.recovery_point_retention_hours * 3600 * 10**9
        pruned = applier.prune_points(older_than_ns=time.time_ns() - retention_ns) if retention_ns else []
        step("prune")
        points_mirror(item=item, points=applier.list_points())
        step("mirror")
        sizes = applier.disk_sizes()  # a disk that grew or joined: its size as the stream says
        for d in item.replica_disks.all():
            if d.index in sizes and sizes[d.index] != d.capacity_bytes:
                ReplicaDisk.objects.filter(pk=d.pk).update(capacity_bytes=sizes[d.index])
        # The data path in bytes (replication/data_path.py): sealed log bytes applied, ever,
        # and what is left in cache storage after this pass.
        fields = {"applied_seq": result.applied_seq, "applied_log_bytes": F("applied_log_bytes") + result.log_bytes_applied,
                  "last_applied_at": dj_timezone.now()}
        try:
            fields.update(storage_waiting_bytes=applier.waiting_log_bytes(), storage_measured_at=dj_timezone.now())
        except Exception as e:  # a figure for the page only: the pass itself succeeded
            logger.warning("item %s: cannot measure the logs waiting in cache storage: %s", item.pk, e)
        if result.errors:
            err = result.errors[0]
            fields["last_error"] = f"Replication data rejected: {err}"
        ProtectedItem.objects.filter(pk=item.pk).update(**fields)
        if result.errors:
            for err in result.errors:
                alert_raise(
                    vault=item.vault, key=f"rejected:{item.pk}:{err.seq}", kind="replication_data_rejected",
                    message=f"{item.name}: replication log {err.seq} was rejected ({err.reason}) and not applied: {err.message}",
                    severity=Severity.CRITICAL, protected_item=item,
                )
            logger.warning("item %s: %s", item.pk, "; ".join(str(e) for e in result.errors))
        if result.misplaced:
            _misplaced_logs(item, result.misplaced)
        if result.lost:
            _lost_logs(item, result.lost)
        elif result.damaged_since is not None and item.protection_state == P.PROTECTED:
            # a resync ended without comparing the replica as read after the loss: another one
                    protected_item_mark_resync_required(item=item, reason=(
                f"the replica still lacks the writes of replication log {result.damaged_since}, lost in cache "
                "storage: the last resynchronization did not compare the replica as it is after that log"))
        if item.protection_state == P.RESYNCING:
            # The agent's resync pass compares the source with the replica as it is: under
            # this lease nothing writes the disks, so their digests are read here.
            wanted = digest_request_read(storage(), item.pk)
            if digest_request_answer(storage(), item_id=item.pk, applied_seq=result.applied_seq,
                                     disks={d.index: d.storage_name for d in item.replica_disks.all() if d.index in sizes}):
                if wanted is not None and applier.repair_compared(from_seq=wanted):
                    event_record(vault=item.vault, kind="resync_compares_damage", message=(
                        f"The resynchronization of {item.name} compares the source with the replica as it is after "
                        "the lost replication logs; recovery points are cut again once it is applied."),
                        protected_item=item)
        if result.initial_copy_complete and item.protection_state == P.INITIAL_REPLICATION:
            protected_item_transition(item_id=item.pk, to_state=P.PROTECTED, operation="finish initial replication",
                                      initial_replication_progress=100)
            job_wake(initial_slot_wait_key(item.process_server_id))  # a slot is free for a waiting enable
            event_record(vault=item.vault, kind="initial_replication_done", message=f"Initial replication of {item.name} is complete; delta replication goes on.", protected_item=item)
        step("finish")
        return {
            "seconds": seconds,
            "batches": result.batches_applied, "bytes": result.bytes_applied, "log_bytes": result.log_bytes_applied,
            "points": result.points_cut,
            "pruned": len(pruned), "applied_seq": result.applied_seq, "more": result.more_pending,
            "errors": [str(e) for e in result.errors],
        }
    finally:
        lease.release()
        # Jobs waiting on this item (an initial copy, a resync's apply) look again now.
        job_wake(item_wait_key(item_id))


def _misplaced_logs(item: ProtectedItem, misplaced) -> None:
    """Logs that arrived numbered behind what the replica has applied: kept aside, never
    applied, never silently dropped. The item cannot be trusted to be complete: say so
    loudly and have it resynchronized (every block compared with the source)."""
    first = misplaced[0]
    for err in misplaced:
        logger.error("item %s: %s", item.pk, err)
    alert_raise(
        vault=item.vault, key=f"misplaced:{item.pk}", kind="replication_log_misplaced",
        message=(f"{item.name}: {len(misplaced)} replication log(s) arrived numbered behind what the replica had "
                 f"already applied (first: log {first.seq}). They were kept aside ({first.key}), not applied; the "
                 "item needs a full resynchronization."),
        severity=Severity.CRITICAL, protected_item=item,
    )
    protected_item_mark_resync_required(
        item=item, reason=f"replication log {first.seq} arrived behind the replica's applied position and could not be placed",
    )


def _lost_logs(item: ProtectedItem, lost) -> None:
    """Logs lost in cache storage (missing, or failing authentication or decoding): the
    unreadable ones are kept in quarantine, the stream goes on after them, and the replica
    lacks their writes until a resync: say so loudly and have the item resynchronized."""
    first = lost[0]
    for err in lost:
        logger.error("item %s: %s", item.pk, err.message)
    seqs = f"log {first.seq}" if len(lost) == 1 else f"logs {first.seq} to {lost[-1].seq}"
    alert_raise(
        vault=item.vault, key=f"lost:{item.pk}:{first.seq}", kind="replication_log_lost",
        message=(f"{item.name}: replication {seqs} could not be applied: {first.message}. Unreadable logs are kept "
                 f"in quarantine ({first.key if first.reason != 'missing' else 'nothing to keep'}); no recovery "
                 "point is cut until a resynchronization has repaired the replica."),
        severity=Severity.CRITICAL, protected_item=item,
    )
    protected_item_mark_resync_required(
        item=item, reason=f"replication {seqs} {'went missing from' if first.reason == 'missing' else 'failed to read from'} "
                          "cache storage before it was applied; the replica lacks its writes",
    )


def points_mirror(*, item: ProtectedItem, points) -> None:
    """Make the item's RecoveryPoint rows equal the data plane's list (the source of truth).

    Every apply pass of every item runs this, most with nothing new: such a pass reads the
    item's point ids and writes no row (no DELETE, and the item's UPDATE matches nothing)."""
    wanted = {p.point_id: p for p in points}
    with transaction.atomic():
        have = set(RecoveryPoint.objects.filter(item=item).values_list("point_id", flat=True))
        if have - wanted.keys():  # pruned by retention, released by a commit, or deleted
            RecoveryPoint.objects.filter(item=item).exclude(point_id__in=wanted.keys()).delete()
        # A point cut at a replication group's barrier is the item's share of the group point.
        groups = {str(g) for g in GroupRecoveryPoint.objects.filter(
            pk__in=[_group_of(p.label) for pid, p in wanted.items() if pid not in have and _group_of(p.label)],
        ).values_list("pk", flat=True)}
        RecoveryPoint.objects.bulk_create([
            RecoveryPoint(
                item=item, point_id=p.point_id, seq=p.seq, time=ns_to_dt(p.source_time_ns),
                type=(RecoveryPointType.NOT_CRASH_CONSISTENT if not p.consistent
                      else RecoveryPointType.APP_CONSISTENT if p.kind == "app_consistent"
                      else RecoveryPointType.CRASH_CONSISTENT),
                label=_label(p.label),
                group_point_id=_group_of(p.label) if _group_of(p.label) in groups and p.consistent else None,
            )
            for pid, p in wanted.items() if pid not in have
        ])
        newest = max((p.source_time_ns for p in points), default=None)
        fields = {"last_recovery_point_at": ns_to_dt(newest) if newest else None}
        seen = {p.label.get("id") for p in points if isinstance(p.label, dict)}
        if item.pending_bookmarks and seen:
            fields["pending_bookmarks"] = [b for b in item.pending_bookmarks if b.get("id") not in seen]
        row = ProtectedItem.objects.filter(pk=item.pk)
        if "pending_bookmarks" not in fields:
            row = row.exclude(last_recovery_point_at=fields["last_recovery_point_at"])
        row.update(**fields)


def _group_of(label) -> str | None:
    group = label.get("group") if isinstance(label, dict) else None
    try:
        return str(uuid.UUID(str(group))) if group else None
    except ValueError:
        return None


def _label(label) -> str:
    if label is None:
        return ""
    if isinstance(label, dict):
        return str(label.get("label") or label.get("id") or label)[:255]
    return str(label)[:255]


def disk_image_stream(*, item: ProtectedItem, point: RecoveryPoint, disk_index: int):
    """(size, iterator of chunks) of a replica disk as of a recovery point."""
    applier = applier_for(item)
    try:
        kept = applier.get_point(point.point_id)
    except PointNotFound:
        raise NotFound("This recovery point has just been pruned by retention.") from None
    if disk_index not in kept.snapshots:
        raise NotFound(f"This recovery point has no disk {disk_index}: the disk was added to the machine after it, "
                       "or removed before it.")
    size = applier.disk_size_at(point.point_id, disk_index)
    return size, applier.iter_disk_image(point.point_id, disk_index)
