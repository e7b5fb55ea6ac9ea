"""The apply engine: replication logs -> replica disks -> recovery points.

``ReplicaApplier(storage, key=..., item_id=..., disks={index: DiskSpec(name, size)})``
applies one protected item's logs (``logs/<item>/<seq:020d>.lbs``, sealed with context
``"<item>:<seq>"``) to its replica disks in seq order and cuts recovery points. Its state
lives in cache storage as ``replicas/<item>/state.json`` and is the source of truth for the
item's recovery points; the Django side mirrors it with ``list_points()``.

One apply pass (``apply_pending``):

1. loads the state and finishes any operation a crash interrupted (see below);
2. for each log after the applied seq, in order (stopping at a gap, at ``max_batches`` or at
   the first bad log): fetch, unseal, decode and check it against the item and its disks
   (all before writing a byte of it; this happens one or two logs ahead in a helper thread),
   then write its records to the replica disks;
3. after a batch, cuts a point if one is due (below): flushes the disks, records the point as
   *pending* in the state (durably), snapshots every disk, then records the point as done;
4. at the end (and every ``checkpoint_bytes`` of a long catch-up) flushes the written disks
   once, saves the state with the new applied seq, and only then deletes the applied logs.

**Logs behind the applied seq.** A number alone never condemns a log (``_settle_stale``):
leftovers of a cut-short clean-up and re-uploads of the very object applied (same seal tag)
are deleted; anything else is moved intact to ``quarantine/<item>/`` and reported in
``ApplyResult.misplaced``. ``stream_floor`` tells a process server where the item's stream
stands in storage, so its numbering never goes back behind the replica.

**Recovery points.** None before the initial copy is complete (a batch flagged
``FLAG_INITIAL_DONE`` applied). After that, at the boundary after each batch: an
app-consistent point if the batch ends with a bookmark (its JSON label is the point's
label; a bookmark whose label names a replication group's point, ``group``, makes a
crash-consistent point with that label: the member's share of the group point); otherwise
a crash-consistent point if at least the interval has passed in source
time since the last point (or the source clock went back). Boundaries inside an initial
copy or a resync pass (``FLAG_INITIAL`` without ``FLAG_INITIAL_DONE``, ``FLAG_RESYNC``)
are not consistent and get no point; a bookmark there is counted in
``ApplyResult.bookmarks_skipped``. The decision depends only on the logs and the state, so
a replay makes the same points.

**Crash safety.** Writes are absolute, so re-applying the logs after the durable applied seq
gives the same bytes. Nothing is written past a pending point's seq until the point is
done, so after a crash the retry deletes the snapshots the interrupted cut left (any snapshot
of the item's disks no point refers to) and takes them again: a half-made point is never
visible. Pruning records the snapshots it will delete in the state before deleting them, and
deleting a replica marks the state first; both are finished by the next call.

**Disks that change shape.** The stream says when a disk's size changes: a disk record
(``KIND_DISK``) sets the disk's size from that point of the stream on. A bigger size grows
the replica disk, a disk the state does not know yet joins it (created from the
``DiskSpec`` the caller gives for that index), size 0 retires the disk (kept for the points
that have it, left out of newer ones). The state's sizes are the truth once a disk is in it;
a ``DiskSpec`` size only creates a disk, and a disk joins the state from its ``DiskSpec``
only until the initial copy is complete (later ones join through the stream). Writes are
checked against the size in force where they stand in the stream. Every point records each
disk's size, and snapshots keep the size they were taken at, so a point from before a disk
grew reads at its old size. A batch of disk records only cuts no point.

**Seeding** (failback). ``seed`` makes a new replica (nothing applied yet) hold a copy of
the disks that already exists: the original on-premises disk when a recovered VM replicates
back, or a flat image. Only the source's allocated, non-zero ranges are written (a new disk
reads as zeros), and the replica counts as initially copied: the agent then compares its
disks with the replica by checksums (a resync pass) instead of copying them, and points are
cut from the first batch after that pass. Seeding again before any batch is applied starts
the disks over, so a seed a crash cut short is simply run again.

Calls for one item (seed, apply, prune, delete) must not run at the same time: the caller
holds the item's lock (one apply task per item). Reading points may happen anywhere.
"""
from __future__ import annotations

import errno
import json
import os
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Mapping

from .batch import (
    FLAG_INITIAL,
    FLAG_INITIAL_DONE,
    FLAG_FROZEN_END,
    FLAG_RESYNC,
    FLAG_UNFROZEN,
    KIND_BOOKMARK,
    KIND_DISK,
    KIND_WRITE,
    MAX_DISKS,
    SECTOR,
    Batch,
    MalformedBatch,
    decode,
)
from .buffers import BufferPool
from .sealing import TAG_BYTES, TamperedData, unseal
from .storage import MAX_PAGE_WRITE, DiskNotFound, ObjectNotFound, Storage

CRASH_CONSISTENT = "crash_consistent"
APP_CONSISTENT = "app_consistent"
POINT_KINDS = (CRASH_CONSISTENT, APP_CONSISTENT)

DEFAULT_CHECKPOINT_BYTES = 1024 * 1024 * 1024
DEFAULT_IMAGE_CHUNK = 4 * 1024 * 1024
STATE_FORMAT = 1
RECENT_TAGS = 256  # applied logs remembered by seal tag (a process server re-uploads far fewer)
# A log missing while later ones are in storage is waited for this long before it is owned
# up to as lost (a process server puts an item's logs in seq order, so a gap is rare and short).
DEFAULT_GAP_GRACE_S = 120.0
_PREFETCH = 2  # logs fetched and opened ahead of the one being written
_OPENERS = 2  # threads fetching and opening them (the work releases the GIL)
# Seeding reads the source in pieces of this size (one page write on Azure, whole chunks of
# local storage) and writes only the units of them that are not all zeros.
SEED_PIECE = MAX_PAGE_WRITE
SEED_ZERO_UNIT = 1024 * 1024
# Sealed logs and their decrypted (still compressed) bytes are read into buffers kept for
# the next log, shared by every applier of the process.
_BUFFERS = BufferPool(keep_bytes=64 * 1024 * 1024)


def _seal_tag(view: memoryview) -> str:
    return bytes(view[-TAG_BYTES:]).hex() if len(view) >= TAG_BYTES else ""


def stream_floor(storage: Storage, item_id: uuid.UUID | str) -> int:
    """The highest seq of the item's stream that storage already holds: the newest log
    uploaded, or the replica's applied seq, whichever is higher (0 for a new item).

    A process server with no state of its own for the item continues the stream after this
    (and never below it): the numbering of a stream never goes back behind what apply has
    seen, whatever happens to process-server caches. Raises on a storage error, so a caller
    cannot mistake "could not read" for "nothing there".
    """
    item = str(uuid.UUID(str(item_id)))
    prefix = f"logs/{item}/"
    floor = 0
    for key in storage.list_objects(prefix):
        name = key[len(prefix):]
        if len(name) == 24 and name.endswith(".lbs") and name[:20].isdigit():
            floor = max(floor, int(name[:20]))
    try:
        raw = storage.get_object(f"replicas/{item}/state.json")
    except ObjectNotFound:
        return floor
    st = _State.from_bytes(raw, f"replicas/{item}/state.json")
    return max(floor, st.applied_seq)


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the allocated ranges of an open file below ``size`` (SEEK_DATA /
    SEEK_HOLE); where the file cannot tell (no support in the file system or platform),
    the rest of it as one range."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    pos = 0
    while pos < size:
        if seek_data is None or seek_hole is None:
            yield pos, size
            return
        try:
            start = os.lseek(fd, pos, seek_data)
            end = min(os.lseek(fd, start, seek_hole), size) if start < size else size
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole remains
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ESPIPE):
                raise
            seek_data = None  # cannot tell: read the rest
            continue
        if start >= size:
            return
        yield start, end
        pos = end


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` of the file; the bytes read (fewer at its end)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class ApplyStateError(Exception):
    """The engine's state cannot be used (corrupt, or the replica is being deleted)."""


class PointNotFound(LookupError):
    """No such recovery point (or it has no snapshot of the requested disk)."""


def _group_bookmark(label: Any) -> bool:
    """A bookmark placed at a replication group's barrier (its label names the group point)."""
    return isinstance(label, dict) and bool(label.get("group"))


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A replica disk of the item: its storage name and size in bytes."""

    name: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class RecoveryPoint:
    point_id: str
    seq: int  # the last batch the point includes
    source_time_ns: int  # that batch's source time
    kind: str  # CRASH_CONSISTENT | APP_CONSISTENT
    label: Any = field(hash=False)  # the bookmark's JSON label (app-consistent), else None
    snapshots: dict[int, str] = field(hash=False)  # disk index -> snapshot id
    created_ns: int = 0  # wall-clock time the point was cut
    disk_sizes: dict[int, int] = field(default_factory=dict, hash=False)  # disk index -> bytes at the point
    # False when the replica then held blocks of a disk scanned without a frozen view: read
    # over a span of time, they may come from different moments (not crash-consistent).
    consistent: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "point_id": self.point_id,
            "seq": self.seq,
            "source_time_ns": self.source_time_ns,
            "kind": self.kind,
            "label": self.label,
            "snapshots": {str(i): s for i, s in sorted(self.snapshots.items())},
            "created_ns": self.created_ns,
            "disk_sizes": {str(i): n for i, n in sorted(self.disk_sizes.items())},
            "consistent": self.consistent,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RecoveryPoint":
        return cls(
            point_id=d["point_id"],
            seq=int(d["seq"]),
            source_time_ns=int(d["source_time_ns"]),
            kind=d["kind"],
            label=d.get("label"),
            snapshots={int(i): s for i, s in d.get("snapshots", {}).items()},
            created_ns=int(d.get("created_ns", 0)),
            disk_sizes={int(i): int(n) for i, n in d.get("disk_sizes", {}).items()},
            consistent=bool(d.get("consistent", True)),
        )


@dataclass(frozen=True, slots=True)
class ApplyError:
    """A log that was rejected and not applied."""

    seq: int
    key: str
    reason: str  # 'tampered' (failed authentication), 'malformed', 'invalid' (wrong item/seq/disk)
    message: str

    def __str__(self) -> str:
        return f"log {self.seq} ({self.key}) rejected, {self.reason}: {self.message}"


@dataclass(slots=True)
class ApplyResult:
    batches_applied: int = 0
    bytes_applied: int = 0  # bytes written to the replica disks
    log_bytes_applied: int = 0  # bytes of the (sealed) logs applied, as cache storage held them
    new_points: list[RecoveryPoint] = field(default_factory=list)
    applied_seq: int = 0
    last_source_time_ns: int | None = None  # source time of the newest applied batch, ever
    errors: list[ApplyError] = field(default_factory=list)
    initial_copy_complete: bool = False
    bookmarks_skipped: int = 0
    waiting_for_seq: int | None = None  # set when a later log exists but this one does not yet
    misplaced: list[ApplyError] = field(default_factory=list)  # logs moved to quarantine
    # Logs lost in cache storage (missing past the grace, or unreadable: moved to quarantine)
    # and bridged by this pass; the replica is damaged from the first of them on.
    lost: list[ApplyError] = field(default_factory=list)
    damaged_since: int | None = None  # the replica lacks a lost log's writes from this seq on
    more_pending: bool = False  # stopped at max_batches with logs left

    @property
    def points_cut(self) -> int:
        return len(self.new_points)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(slots=True)
class SeedResult:
    """What ``seed`` copied, per disk index: bytes read from the source and bytes written to
    the replica disk (fewer: holes are not read, and zeros are read but not written)."""

    bytes_read: dict[int, int] = field(default_factory=dict)
    bytes_written: dict[int, int] = field(default_factory=dict)

    @property
    def total_read(self) -> int:
        return sum(self.bytes_read.values())

    @property
    def total_written(self) -> int:
        return sum(self.bytes_written.values())


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    applied_seq: int
    applied_source_time_ns: int | None
    initial_copy_complete: bool
    point_count: int
    latest_point: RecoveryPoint | None


@dataclass(slots=True)
class _State:
    item_id: str
    replica_id: str
    disks: dict[int, DiskSpec] = field(default_factory=dict)
    applied_seq: int = 0
    applied_source_time_ns: int | None = None
    initial_copy_complete: bool = False
    last_point_source_time_ns: int | None = None
    points: list[RecoveryPoint] = field(default_factory=list)
    pending_point: RecoveryPoint | None = None
    doomed_snapshots: list[tuple[str, str]] = field(default_factory=list)  # (disk name, snapshot id)
    deleting: bool = False
    # Logs through this seq were applied *and deleted* (apply's own clean-up finished): a log
    # at or below it found in storage again is a re-upload or a misplaced log, never a
    # leftover of a cut-short clean-up.
    clean_through: int = 0
    # (seq, seal tag) of the newest applied logs: a log found again with the same tag is the
    # very object applied before (a process server's re-upload) and may go.
    recent_tags: list[tuple[int, str]] = field(default_factory=list)
    # Disks that left the machine: no longer written or snapshotted, kept for older points.
    retired: dict[int, DiskSpec] = field(default_factory=dict)
    # The first missing log while later ones wait, and since when (wall clock, ns).
    gap_seq: int = 0
    gap_since_ns: int = 0
    # The lowest seq of a log that was lost and bridged: the replica lacks its writes, so no
    # point is cut until a resync has compared the source with the replica as read after it.
    damaged_since: int | None = None
    # A batch of a disk scanned without a frozen view was applied: the replica holds blocks
    # read at different moments, and its points are not crash-consistent.
    mixed: bool = False

    def spec(self, index: int) -> DiskSpec | None:
        """The disk at ``index``, live or retired."""
        return self.disks.get(index) or self.retired.get(index)

    def to_bytes(self) -> bytes:
        d = {
            "format": STATE_FORMAT,
            "item_id": self.item_id,
            "replica_id": self.replica_id,
            "disks": {
                str(i): {"name": s.name, "size_bytes": s.size_bytes} for i, s in sorted(self.disks.items())
            },
            "applied_seq": self.applied_seq,
            "applied_source_time_ns": self.applied_source_time_ns,
            "initial_copy_complete": self.initial_copy_complete,
            "last_point_source_time_ns": self.last_point_source_time_ns,
            "points": [p.to_json() for p in self.points],
            "pending_point": self.pending_point.to_json() if self.pending_point else None,
            "doomed_snapshots": [list(x) for x in self.doomed_snapshots],
            "deleting": self.deleting,
            "clean_through": self.clean_through,
            "recent_tags": [list(x) for x in self.recent_tags],
            "retired": {
                str(i): {"name": s.name, "size_bytes": s.size_bytes} for i, s in sorted(self.retired.items())
            },
            "gap_seq": self.gap_seq,
            "gap_since_ns": self.gap_since_ns,
            "damaged_since": self.damaged_since,
            "mixed": self.mixed,
            "saved_ns": time.time_ns(),
        }
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> "_State":
        try:
            d = json.loads(raw)
            if d.get("format") != STATE_FORMAT:
                raise ApplyStateError(f"{where}: unsupported state format {d.get('format')!r}")
            return cls(
                item_id=d["item_id"],
                replica_id=d["replica_id"],
                disks={int(i): DiskSpec(s["name"], int(s["size_bytes"])) for i, s in d["disks"].items()},
                applied_seq=int(d["applied_seq"]),
                applied_source_time_ns=d.get("applied_source_time_ns"),
                initial_copy_complete=bool(d["initial_copy_complete"]),
                last_point_source_time_ns=d.get("last_point_source_time_ns"),
                points=[RecoveryPoint.from_json(p) for p in d["points"]],
                pending_point=RecoveryPoint.from_json(d["pending_point"]) if d.get("pending_point") else None,
                doomed_snapshots=[(str(a), str(b)) for a, b in d.get("doomed_snapshots", [])],
                deleting=bool(d.get("deleting", False)),
                clean_through=int(d.get("clean_through", 0)),
                recent_tags=[(int(a), str(b)) for a, b in d.get("recent_tags", [])],
                retired={int(i): DiskSpec(s["name"], int(s["size_bytes"])) for i, s in d.get("retired", {}).items()},
                gap_seq=int(d.get("gap_seq", 0)),
                gap_since_ns=int(d.get("gap_since_ns", 0)),
                damaged_since=int(d["damaged_since"]) if d.get("damaged_since") is not None else None,
                mixed=bool(d.get("mixed", False)),
            )
        except ApplyStateError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ApplyStateError(
                f"{where} is corrupt ({type(e).__name__}: {e}); refusing to guess"
            ) from None


@dataclass(slots=True)
class _Opened:
    seq: int
    key: str
    batch: Batch | None = None
    error: ApplyError | None = None
    label: Any = None
    has_bookmark: bool = False
    tag: str = ""  # the sealed object's authentication tag: names this very object
    sealed_bytes: int = 0  # the log's size in storage


class ReplicaApplier:
    """Applies one protected item's replication logs to its replica disks (module docstring)."""

    def __init__(
        self,
        storage: Storage,
        *,
        key: bytes,
        item_id: uuid.UUID | str,
        disks: Mapping[int, DiskSpec | tuple[str, int]],
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
    ):
        self.storage = storage
        self.key = key
        self.item_id = str(uuid.UUID(str(item_id)))
        self.disks: dict[int, DiskSpec] = {}
        for index, spec in disks.items():
            spec = spec if isinstance(spec, DiskSpec) else DiskSpec(*spec)
            if not 0 <= int(index) < MAX_DISKS:
                raise ValueError(f"disk index {index} is outside 0..{MAX_DISKS - 1}")
            if spec.size_bytes <= 0 or spec.size_bytes % SECTOR:
                raise ValueError(
                    f"disk {index} ({spec.name}) size {spec.size_bytes} "
                    f"is not a positive multiple of {SECTOR}"
                )
            self.disks[int(index)] = spec
        names = [s.name for s in self.disks.values()]
        if len(set(names)) != len(names):
            raise ValueError(f"replica disk names must be distinct, got {names}")
        self.checkpoint_bytes = checkpoint_bytes
        self.logs_prefix = f"logs/{self.item_id}/"
        self.quarantine_prefix = f"quarantine/{self.item_id}/"
        self.state_key = f"replicas/{self.item_id}/state.json"
        self._disks_ready = False

    def __repr__(self) -> str:
        return f"ReplicaApplier(item={self.item_id}, storage={self.storage!r})"

    # -- state ----------------------------------------------------------------------------
    def _load_state(self, *, create: bool) -> _State | None:
        try:
            raw = self.storage.get_object(self.state_key)
        except ObjectNotFound:
            if not create:
                return None
            return _State(item_id=self.item_id, replica_id=uuid.uuid4().hex[:12])
        st = _State.from_bytes(raw, self.state_key)
        if st.item_id != self.item_id:
            raise ApplyStateError(f"{self.state_key} belongs to item {st.item_id}, not {self.item_id}")
        return st

    def _save(self, st: _State) -> None:
        self.storage.put_object(self.state_key, st.to_bytes())

    def _ensure_disks(self, st: _State) -> None:
        """Every disk of the state exists at the state's size (a size change whose batch was
        applied but not checkpointed is undone here and redone by the replay); disks the
        caller names join the state until the initial copy is complete."""
        changed = False
        for index, spec in sorted(self.disks.items()):
            known = st.spec(index)
            if known is not None and known.name != spec.name:
                raise ApplyStateError(
                    f"item {self.item_id} disk {index} is replicated to {known.name!r}, not {spec.name!r} "
                    "(replica disks cannot be renamed)"
                )
            if known is None and not st.initial_copy_complete:
                st.disks[index] = spec
                changed = True
        if not self._disks_ready:
            for spec in st.disks.values():
                if not self.storage.disk_exists(spec.name):
                    self.storage.create_disk(spec.name, spec.size_bytes)
                elif self.storage.disk_size(spec.name) != spec.size_bytes:
                    self.storage.resize_disk(spec.name, spec.size_bytes)
        if changed:
            self._save(st)
        self._disks_ready = True

    def _recover(self, st: _State, result: ApplyResult | None = None) -> None:
        """Finish what a crash interrupted: snapshot deletions, then a pending point."""
        if st.doomed_snapshots:
            for name, sid in st.doomed_snapshots:
                self.storage.delete_snapshot(name, sid)
            st.doomed_snapshots = []
            self._save(st)
        if st.pending_point is not None:
            if st.pending_point.seq != st.applied_seq:
                raise ApplyStateError(
                    f"{self.state_key}: pending point at seq {st.pending_point.seq} "
                    f"but applied seq is {st.applied_seq}"
                )
            for index, spec in sorted({**st.retired, **st.disks}.items()):
                keep = {p.snapshots.get(index) for p in st.points}
                try:
                    existing = self.storage.list_snapshots(spec.name)
                except DiskNotFound:
                    continue
                for sid in existing:
                    if sid not in keep:  # left by the interrupted cut
                        self.storage.delete_snapshot(spec.name, sid)
            point = self._finish_point(st)
            if result is not None:
                result.new_points.append(point)

    # -- seeding --------------------------------------------------------------------------
    def seed(self, sources: Mapping[int, str | os.PathLike[str] | Iterable[bytes]]) -> SeedResult:
        """Make a new replica hold a copy of its disks that already exists (module docstring).

        ``sources`` gives, per disk index of ``disks``, the path of a flat image file (or
        block device), or an iterable of byte pieces read in order from offset 0. A source
        shorter than its disk leaves the rest zero; a disk without a source stays all
        zeros (the checksum compare that follows sends it whole). The state is saved with
        the initial copy complete only once every disk is written and flushed.

        Only a replica that has applied nothing can be seeded (``ApplyStateError``
        otherwise); seeding it again (after a crash, or from other sources) recreates its
        disks first, so nothing of an earlier seed stays behind. A source longer than its
        disk is a ``ValueError``; for a file that is found before anything changes.
        """
        unknown = sorted(set(sources) - set(self.disks))
        if unknown:
            raise ValueError(f"item {self.item_id} has no disk {', '.join(map(str, unknown))} to seed "
                             f"(its disks are {', '.join(map(str, sorted(self.disks)))})")
        files: dict[int, int] = {}
        try:
            for index, source in sorted(sources.items()):
                if not isinstance(source, (str, os.PathLike)):
                    continue
                fd = files[index] = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                size, disk = os.lseek(fd, 0, os.SEEK_END), self.disks[index]
                if size > disk.size_bytes:
                    raise ValueError(f"cannot seed disk {index} ({disk.name}, {disk.size_bytes} bytes) of item "
                                     f"{self.item_id} from {os.fspath(source)}: the image is larger ({size} bytes)")
            st = self._load_state(create=True)
            assert st is not None
            if st.deleting:
                raise ApplyStateError(f"the replica of item {self.item_id} is being deleted")
            if st.applied_seq or st.points or st.pending_point is not None:
                raise ApplyStateError(
                    f"the replica of item {self.item_id} cannot be seeded: it has already applied replication "
                    f"logs (through seq {st.applied_seq}, {len(st.points)} recovery points); only a new replica "
                    "can be seeded (delete the replica first to start it over from a copy)")
            # Durably not complete before a byte changes: a seed cut short is never taken for a copy.
            names = {s.name for s in (*st.disks.values(), *self.disks.values())}
            st.initial_copy_complete = False
            st.disks, st.retired = {}, {}
            self._save(st)
            for name in sorted(names):
                self.storage.delete_disk(name)  # what an earlier seed wrote goes with it
            self._disks_ready = False
            self._ensure_disks(st)  # the disks, new and all zeros, as the first apply pass makes them
            result = SeedResult()
            zeros = bytes(SEED_PIECE)
            for index, source in sorted(sources.items()):
                spec = st.disks[index]
                if index in files:
                    read, written = self._seed_file(spec, files[index], zeros)
                else:
                    read, written = self._seed_pieces(spec, source, zeros)  # type: ignore[arg-type]
                self.storage.flush_disk(spec.name)
                result.bytes_read[index], result.bytes_written[index] = read, written
            st.initial_copy_complete = True
            self._save(st)
            return result
        finally:
            for fd in files.values():
                os.close(fd)

    def _seed_file(self, spec: DiskSpec, fd: int, zeros: bytes) -> tuple[int, int]:
        """Copy the allocated ranges of an open image into a new replica disk, in pieces
        that start on ``SEED_PIECE`` boundaries; (bytes read, bytes written)."""
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass  # only a hint
        buf = bytearray(SEED_PIECE)
        read = written = done = 0
        for start, end in _data_ranges(fd, size):
            # Whole sectors: an image that ends inside one is padded with zeros (the disk,
            # a whole number of sectors, is at least as large).
            pos = max(done, start - start % SECTOR)
            end = -(-end // SECTOR) * SECTOR
            while pos < end:
                n = min(SEED_PIECE - pos % SEED_PIECE, end - pos)
                got = _pread_into(fd, memoryview(buf)[:n], pos)
                read += got
                if got < n:
                    buf[got:n] = bytes(n - got)  # past the image's end
                written += self._seed_write(spec.name, pos, buf, n, zeros)
                pos += n
            done = end
        return read, written

    def _seed_pieces(self, spec: DiskSpec, pieces: Iterable[bytes], zeros: bytes) -> tuple[int, int]:
        """Copy byte pieces, in order from offset 0, into a new replica disk; (bytes read,
        bytes written)."""
        buf = bytearray(SEED_PIECE)
        read = written = fill = offset = 0
        for piece in pieces:
            view = memoryview(piece)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            if offset + fill + len(view) > spec.size_bytes:
                raise ValueError(f"cannot seed disk {spec.name} ({spec.size_bytes} bytes) of item {self.item_id}: "
                                 f"its source goes on past {offset + fill + len(view)} bytes")
            read += len(view)
            while view:
                take = min(len(buf) - fill, len(view))
                buf[fill : fill + take] = view[:take]
                fill += take
                view = view[take:]
                if fill == len(buf):
                    written += self._seed_write(spec.name, offset, buf, fill, zeros)
                    offset, fill = offset + fill, 0
        if fill:
            padded = -(-fill // SECTOR) * SECTOR
            buf[fill:padded] = bytes(padded - fill)
            written += self._seed_write(spec.name, offset, buf, padded, zeros)
        return read, written

    def _seed_write(self, name: str, offset: int, buf: bytearray, length: int, zeros: bytes) -> int:
        """Write ``buf[:length]`` at ``offset`` but for its ``SEED_ZERO_UNIT`` units of zeros
        (the new disk reads them as zeros already); the bytes written. The disk is new and
        has no snapshot, so no write copies a chunk version (no ``prepare_writes`` needed)."""
        if (buf if length == len(buf) else buf[:length]) == zeros[:length]:
            return 0
        view = memoryview(buf)
        written = 0
        run = None  # start of the run of non-zero units being gathered
        for at in range(0, length, SEED_ZERO_UNIT):
            unit = min(SEED_ZERO_UNIT, length - at)
            if buf[at : at + unit] == zeros[:unit]:
                if run is not None:
                    self.storage.write_disk(name, offset + run, view[run:at])
                    written += at - run
                    run = None
            elif run is None:
                run = at
        if run is not None:
            self.storage.write_disk(name, offset + run, view[run:length])
            written += length - run
        return written

    # -- applying -------------------------------------------------------------------------
    def apply_pending(
        self,
        *,
        now_ns: int | None = None,
        crash_consistent_interval_s: float,
        max_batches: int | None = None,
        gap_grace_s: float = DEFAULT_GAP_GRACE_S,
    ) -> ApplyResult:
        """Apply the item's pending logs in order and cut the recovery points that are due.

        ``now_ns`` is the wall-clock time recorded on points cut (default: now). Rejected
        logs stop the pass and are reported in ``errors``; nothing of them is applied.

        Logs lost in cache storage are never skipped silently (``_bridge``): a log that
        fails authentication or decoding is moved intact to ``quarantine/<item>/``, a log
        missing for ``gap_grace_s`` while later ones are there is given up; either is
        reported in ``lost`` and the replica is *damaged* from it on: no point is cut until
        a resync compares the source with the replica as read after it (``repair_compared``).
        """
        if crash_consistent_interval_s < 0:
            raise ValueError("crash_consistent_interval_s must be 0 or more")
        if max_batches is not None and max_batches < 0:
            raise ValueError("max_batches must be 0 or more")
        interval_ns = int(crash_consistent_interval_s * 1_000_000_000)
        now = time.time_ns() if now_ns is None else now_ns
        st = self._load_state(create=True)
        assert st is not None
        if st.deleting:
            raise ApplyStateError(f"the replica of item {self.item_id} is being deleted")
        self._ensure_disks(st)
        result = ApplyResult()
        self._recover(st, result)

        stale, pending = self._scan_logs(st.applied_seq)
        self._settle_stale(st, stale, result)
        st.clean_through = st.applied_seq  # whatever is left at or below it is settled (saved
        # with this pass's first checkpoint)

        saved_gap = (st.gap_seq, st.gap_since_ns)
        if pending and pending[0][0] > st.applied_seq + 1:
            missing = st.applied_seq + 1
            if st.gap_seq != missing:
                st.gap_seq, st.gap_since_ns = missing, now
            elif now - st.gap_since_ns >= gap_grace_s * 1_000_000_000:
                self._bridge(st, result, missing, pending[0][0] - 1, (
                    f"missing from cache storage for {(now - st.gap_since_ns) / 1e9:.0f} s while later logs "
                    f"(from {pending[0][0]}) are there"))
        expected = st.applied_seq + 1
        runnable: list[tuple[int, str]] = []
        for seq, key in pending:
            if seq != expected:
                result.waiting_for_seq = expected
                if not runnable:
                    break
                if st.gap_seq != expected:  # the wait for it starts now
                    st.gap_seq, st.gap_since_ns = expected, now
                break
            runnable.append((seq, key))
            expected += 1
        if result.waiting_for_seq is None:
            st.gap_seq = st.gap_since_ns = 0
        if max_batches is not None and len(runnable) > max_batches:
            runnable = runnable[:max_batches]
            result.more_pending = True

        done_keys: list[str] = []
        dirty: set[str] = set()
        unflushed = 0
        if runnable:
            with ThreadPoolExecutor(max_workers=_OPENERS, thread_name_prefix=f"apply-{self.item_id[:8]}") as pool:
                ahead: deque[Future[_Opened]] = deque()
                todo = iter(runnable)

                def refill() -> None:
                    while len(ahead) < _PREFETCH + 1:
                        nxt = next(todo, None)
                        if nxt is None:
                            return
                        ahead.append(pool.submit(self._open, nxt[0], nxt[1]))

                refill()
                try:
                    while ahead:
                        opened = ahead.popleft().result()
                        if opened.error is not None and opened.error.reason in ("tampered", "malformed"):
                            refill()
                            self._quarantine_unreadable(st, result, opened.error)
                            continue
                        if opened.error is not None:
                            if opened.error.reason == "missing":  # gone between listing and reading
                                result.waiting_for_seq = opened.seq
                            else:
                                result.errors.append(opened.error)
                            result.more_pending = False
                            break
                        batch = opened.batch
                        assert batch is not None
                        problem = self._check_disks(st, opened)
                        if problem is not None:
                            result.errors.append(problem)
                            result.more_pending = False
                            break
                        refill()
                        written = self._write(batch, st, dirty)
                        if batch.flags & FLAG_UNFROZEN:
                            st.mixed = True
                        elif batch.flags & FLAG_FROZEN_END:
                            st.mixed = False
                        st.applied_seq = batch.seq
                        st.applied_source_time_ns = batch.source_time_ns
                        st.recent_tags.append((batch.seq, opened.tag))
                        del st.recent_tags[:-RECENT_TAGS]
                        if batch.flags & FLAG_INITIAL_DONE:
                            st.initial_copy_complete = True
                        done_keys.append(opened.key)
                        result.batches_applied += 1
                        result.bytes_applied += written
                        result.log_bytes_applied += opened.sealed_bytes
                        unflushed += written
                        kind = self._point_due(st, batch, opened.has_bookmark, interval_ns)
                        if opened.has_bookmark and kind != APP_CONSISTENT:
                            result.bookmarks_skipped += 1
                        if kind == APP_CONSISTENT and _group_bookmark(opened.label):
                            kind = CRASH_CONSISTENT  # a replication group's barrier: consistent across
                            label = opened.label  # the group's VMs, not quiesced inside them
                        elif kind is not None:
                            label = opened.label if kind == APP_CONSISTENT else None
                        if kind is not None:
                            result.new_points.append(self._cut_point(st, kind, label, now, dirty, done_keys))
                            unflushed = 0
                        elif unflushed >= self.checkpoint_bytes:
                            self._checkpoint(st, dirty, done_keys)
                            unflushed = 0
                finally:
                    for f in ahead:
                        f.cancel()
        # On an exception nothing more is saved: the next pass replays from the durable seq.
        if dirty or done_keys or result.lost or saved_gap != (st.gap_seq, st.gap_since_ns):
            self._checkpoint(st, dirty, done_keys)
        result.damaged_since = st.damaged_since

        result.applied_seq = st.applied_seq
        result.last_source_time_ns = st.applied_source_time_ns
        result.initial_copy_complete = st.initial_copy_complete
        return result

    def _bridge(self, st: _State, result: ApplyResult, first: int, last: int, why: str) -> None:
        """Give up logs ``first``..``last``, lost in cache storage: the stream goes on after
        them (the resync that repairs the replica comes after them in the stream), the loss
        is reported and the replica is damaged from ``first`` on."""
        for seq in range(first, last + 1):
            result.lost.append(ApplyError(seq, f"{self.logs_prefix}{seq:020d}.lbs", "missing", f"log {seq} is {why}"))
        st.applied_seq = max(st.applied_seq, last)
        st.damaged_since = first if st.damaged_since is None else min(st.damaged_since, first)
        st.gap_seq = st.gap_since_ns = 0

    def _quarantine_unreadable(self, st: _State, result: ApplyResult, error: ApplyError) -> None:
        """A log that fails authentication or decoding: moved intact to quarantine (never
        deleted), then given up like a missing one."""
        dest = f"{self.quarantine_prefix}{error.seq:020d}-{time.time_ns()}.lbs"
        try:
            raw = self.storage.get_object(error.key)
        except ObjectNotFound:
            raw = None
        if raw is not None:
            self.storage.put_object(dest, raw)
            self.storage.delete_object(error.key)
        result.lost.append(ApplyError(error.seq, dest if raw is not None else error.key, error.reason,
                                      f"log {error.seq} cannot be read ({error.reason}: {error.message})"
                                      + (f"; kept as {dest}" if raw is not None else "")))
        st.applied_seq = max(st.applied_seq, error.seq)
        st.damaged_since = error.seq if st.damaged_since is None else min(st.damaged_since, error.seq)

    def repair_compared(self, *, from_seq: int) -> bool:
        """A resync pass compares the source with the replica as read after seq ``from_seq``
        (its digest seq): if that is at or after the first lost log, the pass repairs what
        was lost and points may be cut again once it is applied. True if the damage is
        cleared. Called under the item's apply lease."""
        st = self._load_state(create=False)
        if st is None or st.damaged_since is None or from_seq < st.damaged_since:
            return False
        st.damaged_since = None
        self._save(st)
        return True

    def _settle_stale(self, st: _State, stale: list[str], result: ApplyResult) -> None:
        """Logs numbered at or below the applied seq. A number alone never condemns a log:

        - above ``clean_through``: applied, and left by a clean-up that was cut short; deleted;
        - at or below it, with the tag of the log applied at that seq: the same object put
          again (a process server re-uploading after a crash); deleted;
        - anything else cannot be placed: it may carry writes the replica does not have (the
          stream's numbering went back behind the replica's back). It is moved, intact, to
          ``quarantine/<item>/`` and reported in ``result.misplaced``; the caller raises the
          alarm and has the item resynchronized.
        """
        tags = dict(st.recent_tags)
        for key in stale:
            seq = int(key[len(self.logs_prefix):][:20])
            if seq > st.clean_through:
                self.storage.delete_object(key)
                continue
            try:
                raw = self.storage.get_object(key)
            except ObjectNotFound:
                continue
            if tags.get(seq) and _seal_tag(memoryview(raw)) == tags[seq]:
                self.storage.delete_object(key)
                continue
            dest = f"{self.quarantine_prefix}{seq:020d}-{time.time_ns()}.lbs"
            self.storage.put_object(dest, raw)
            self.storage.delete_object(key)
            result.misplaced.append(ApplyError(
                seq, dest, "misplaced",
                f"log {seq} arrived after the replica had already applied (and cleaned up) seq "
                f"{st.clean_through}: it is not the log applied at that seq, so its writes cannot be "
                "placed; kept as " + dest,
            ))

    def waiting_log_bytes(self) -> int:
        """Bytes of the item's logs in cache storage, all waiting to be applied (apply deletes
        what it applied): the last stage of the data path, in the storage's own count."""
        return self.storage.used_bytes(self.logs_prefix)

    def _scan_logs(self, applied_seq: int) -> tuple[list[str], list[tuple[int, str]]]:
        stale: list[str] = []
        pending: list[tuple[int, str]] = []
        for key in self.storage.list_objects(self.logs_prefix):
            name = key[len(self.logs_prefix):]
            if len(name) != 24 or not name.endswith(".lbs") or not name[:20].isdigit():
                continue  # not a log (the process server writes only <seq:020d>.lbs here)
            seq = int(name[:20])
            if seq <= applied_seq:
                stale.append(key)
            else:
                pending.append((seq, key))
        pending.sort()
        return stale, pending

    def _open(self, seq: int, key: str) -> _Opened:
        """Fetch, authenticate, decode and check one log without applying anything."""
        out = _Opened(seq, key)

        def reject(reason: str, message: str) -> _Opened:
            out.error = ApplyError(seq, key, reason, message)
            return out

        try:
            sealed = self.storage.get_object_into(key, _BUFFERS)
        except ObjectNotFound:
            return reject("missing", "the log disappeared from cache storage before it was applied")
        try:
            with sealed:
                out.tag = _seal_tag(sealed.view)
                out.sealed_bytes = len(sealed.view)
                plain = unseal(sealed.view, key=self.key, context=f"{self.item_id}:{seq}".encode(),
                               buffers=_BUFFERS)
        except TamperedData as e:
            return reject("tampered", str(e))
        try:
            # Authenticated, so exactly the bytes whose checksum the process server checked.
            batch = decode(plain, check_crc=False)
        except MalformedBatch as e:
            return reject("malformed", str(e))
        if str(batch.item_id) != self.item_id:
            return reject("invalid", f"the batch belongs to item {batch.item_id}")
        if batch.seq != seq:
            return reject("invalid", f"the batch says seq {batch.seq} but is stored as log {seq}")
        last = len(batch.records) - 1
        for i, rec in enumerate(batch.records):
            if rec.kind == KIND_BOOKMARK:
                if i != last:
                    return reject("invalid", f"record {i + 1} is a bookmark but not the batch's last record")
                try:
                    out.label = json.loads(bytes(rec.data).decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    return reject("malformed", f"bookmark label is not UTF-8 JSON: {e}")
                out.has_bookmark = True
        out.batch = batch
        return out

    def _check_disks(self, st: _State, opened: _Opened) -> ApplyError | None:
        """Check a batch's writes against the disks and sizes in force where they stand in
        the stream (after the batches before it and its own disk records), before a byte of
        it is written."""
        batch = opened.batch
        assert batch is not None
        sizes = {i: s.size_bytes for i, s in st.disks.items()}
        for i, rec in enumerate(batch.records):
            if rec.kind == KIND_DISK:
                if rec.offset == 0:
                    sizes.pop(rec.disk, None)
                elif rec.disk in sizes or (rec.disk in self.disks and rec.disk not in st.retired):
                    sizes[rec.disk] = rec.offset
                else:
                    return ApplyError(opened.seq, opened.key, "invalid",
                                      f"record {i + 1} sizes disk {rec.disk}, which the item does not have "
                                      f"(it has disks {sorted(self.disks)})")
            elif rec.kind == KIND_WRITE:
                size = sizes.get(rec.disk)
                if size is None:
                    return ApplyError(opened.seq, opened.key, "invalid",
                                      f"record {i + 1} writes disk {rec.disk}; the item has disks {sorted(sizes)}")
                if rec.offset + len(rec.data) > size:
                    return ApplyError(opened.seq, opened.key, "invalid",
                                      f"record {i + 1} writes disk {rec.disk} at {rec.offset}+{len(rec.data)}, "
                                      f"past its {size} bytes")
        return None

    def _write(self, batch: Batch, st: _State, dirty: set[str]) -> int:
        written = 0
        write = self.storage.write_disk
        if all(rec.kind == KIND_WRITE for rec in batch.records):  # no size change: the disks are as they are
            extents: dict[str, list[tuple[int, int]]] = {}
            for rec in batch.records:
                extents.setdefault(st.disks[rec.disk].name, []).append((rec.offset, len(rec.data)))
            for name, ext in sorted(extents.items()):
                self.storage.prepare_writes(name, ext)
        for rec in batch.records:
            if rec.kind == KIND_WRITE:
                name = st.disks[rec.disk].name
                write(name, rec.offset, rec.data)
                dirty.add(name)
                written += len(rec.data)
            elif rec.kind == KIND_DISK:
                self._set_disk_size(st, rec.disk, rec.offset)
        return written

    def _set_disk_size(self, st: _State, index: int, size: int) -> None:
        """A disk record: the disk grows (or, announced by a resync, shrinks), joins the
        state, or (size 0) is retired. Snapshots keep the size they were taken at."""
        if size == 0:
            spec = st.disks.pop(index, None)
            if spec is not None:
                st.retired[index] = spec
            return
        spec = st.disks.get(index) or self.disks[index]
        if not self.storage.disk_exists(spec.name):
            self.storage.create_disk(spec.name, size)
        elif self.storage.disk_size(spec.name) != size:
            self.storage.resize_disk(spec.name, size)
        st.disks[index] = DiskSpec(spec.name, size)

    @staticmethod
    def _point_due(st: _State, batch: Batch, has_bookmark: bool, interval_ns: int) -> str | None:
        if not st.initial_copy_complete or st.damaged_since is not None:
            return None
        if batch.flags & FLAG_RESYNC:
            return None
        if batch.flags & FLAG_INITIAL and not batch.flags & FLAG_INITIAL_DONE:
            return None
        if has_bookmark:
            return APP_CONSISTENT
        if batch.records and all(r.kind == KIND_DISK for r in batch.records):
            return None  # a size change alone: the writes that follow make the next point
        last = st.last_point_source_time_ns
        if last is None or batch.source_time_ns - last >= interval_ns or batch.source_time_ns < last:
            return CRASH_CONSISTENT
        return None

    def _flush(self, dirty: set[str]) -> None:
        for name in sorted(dirty):
            self.storage.flush_disk(name)
        dirty.clear()

    def _checkpoint(self, st: _State, dirty: set[str], done_keys: list[str]) -> None:
        self._flush(dirty)
        self._save(st)
        self._delete_logs(done_keys)
        done_keys.clear()
        st.clean_through = st.applied_seq  # durable with the next save; until then a crash
        # leaves these logs as leftovers of a cut-short clean-up, which is what they are

    def _delete_logs(self, keys: list[str]) -> None:
        for key in keys:
            self.storage.delete_object(key)

    def _cut_point(
        self, st: _State, kind: str, label: Any, now: int, dirty: set[str], done_keys: list[str]
    ) -> RecoveryPoint:
        st.pending_point = RecoveryPoint(
            point_id=f"{st.replica_id}-{st.applied_seq:012d}",
            seq=st.applied_seq,
            source_time_ns=st.applied_source_time_ns or 0,
            kind=kind,
            label=label,
            snapshots={},
            created_ns=now,
            consistent=not st.mixed,
        )
        self._checkpoint(st, dirty, done_keys)  # durable writes, then the pending point
        return self._finish_point(st)

    def _finish_point(self, st: _State) -> RecoveryPoint:
        pending = st.pending_point
        assert pending is not None
        snapshots = {index: self.storage.snapshot_disk(spec.name) for index, spec in sorted(st.disks.items())}
        sizes = {index: spec.size_bytes for index, spec in sorted(st.disks.items())}
        point = replace(pending, disk_sizes=sizes, snapshots=snapshots)
        st.points.append(point)
        st.last_point_source_time_ns = point.source_time_ns
        st.pending_point = None
        self._save(st)
        return point

    # -- points ---------------------------------------------------------------------------
    def list_points(self) -> list[RecoveryPoint]:
        """The item's recovery points, oldest first."""
        st = self._load_state(create=False)
        return list(st.points) if st else []

    def get_point(self, point_id: str) -> RecoveryPoint:
        for p in self.list_points():
            if p.point_id == point_id:
                return p
        raise PointNotFound(f"item {self.item_id} has no recovery point {point_id!r}")

    def disk_sizes(self) -> dict[int, int]:
        """Each live replica disk's size now (retired disks are left out)."""
        st = self._load_state(create=False)
        return {i: s.size_bytes for i, s in st.disks.items()} if st else {}

    def status(self) -> ReplicaStatus:
        st = self._load_state(create=False)
        if st is None:
            return ReplicaStatus(0, None, False, 0, None)
        return ReplicaStatus(
            st.applied_seq, st.applied_source_time_ns, st.initial_copy_complete, len(st.points),
            st.points[-1] if st.points else None,
        )

    def prune_points(self, *, older_than_ns: int) -> list[RecoveryPoint]:
        """Delete points whose source time is before ``older_than_ns`` (with their
        snapshots), always keeping the newest point. Returns the deleted points."""
        st = self._load_state(create=False)
        if st is None:
            return []
        if st.deleting:
            raise ApplyStateError(f"the replica of item {self.item_id} is being deleted")
        self._recover(st)
        if len(st.points) < 2:
            return []
        victims = [p for p in st.points[:-1] if p.source_time_ns < older_than_ns]
        if not victims:
            return []
        gone = {p.point_id for p in victims}
        st.points = [p for p in st.points if p.point_id not in gone]
        st.doomed_snapshots = [
            (st.spec(index).name, sid) for p in victims for index, sid in sorted(p.snapshots.items())
        ]
        self._save(st)  # the points are gone before their snapshots are
        self._recover(st)
        return victims

    def delete_points(self, point_ids) -> list[RecoveryPoint]:
        """Delete the given points (with their snapshots); unknown ids are ignored. Returns
        the deleted points. Like pruning, the points go from the state before their
        snapshots do, so a crash never leaves a point without its snapshots."""
        st = self._load_state(create=False)
        if st is None:
            return []
        if st.deleting:
            raise ApplyStateError(f"the replica of item {self.item_id} is being deleted")
        self._recover(st)
        gone = set(point_ids)
        victims = [p for p in st.points if p.point_id in gone]
        if not victims:
            return []
        st.points = [p for p in st.points if p.point_id not in gone]
        st.doomed_snapshots = [
            (st.spec(index).name, sid) for p in victims for index, sid in sorted(p.snapshots.items())
        ]
        self._save(st)
        self._recover(st)
        return victims

    def delete_replica(self) -> None:
        """Remove the item's replica disks (with every point), its logs and its state."""
        st = self._load_state(create=False)
        names = {s.name for s in self.disks.values()}
        if st is not None:
            names.update(s.name for s in st.disks.values())
            names.update(s.name for s in st.retired.values())
            if not st.deleting:
                st.deleting = True
                self._save(st)
        for name in sorted(names):
            self.storage.delete_disk(name)
        self._delete_logs(self.storage.list_objects(self.logs_prefix))
        self._delete_logs(self.storage.list_objects(self.quarantine_prefix))
        self.storage.delete_object(self.state_key)
        self._disks_ready = False

    # -- reading a point ------------------------------------------------------------------
    def _point_disk(self, point_id: str, disk_index: int) -> tuple[str, str]:
        st = self._load_state(create=False)
        for p in st.points if st else []:
            if p.point_id == point_id:
                sid = p.snapshots.get(disk_index)
                if sid is None:
                    raise PointNotFound(f"recovery point {point_id!r} has no disk {disk_index}")
                assert st is not None
                spec = st.spec(disk_index)
                assert spec is not None
                return spec.name, sid
        raise PointNotFound(f"item {self.item_id} has no recovery point {point_id!r}")

    def disk_size_at(self, point_id: str, disk_index: int) -> int:
        name, sid = self._point_disk(point_id, disk_index)
        return self.storage.disk_size(name, snapshot=sid)

    def read_disk_at(self, point_id: str, disk_index: int, offset: int, length: int) -> bytes:
        """Bytes of a replica disk as of a recovery point."""
        name, sid = self._point_disk(point_id, disk_index)
        return self.storage.read_disk(name, offset, length, snapshot=sid)

    def iter_disk_image(
        self, point_id: str, disk_index: int, chunk: int = DEFAULT_IMAGE_CHUNK
    ) -> Iterator[bytes]:
        """The whole raw disk image as of a recovery point, in pieces of ``chunk`` bytes."""
        name, sid = self._point_disk(point_id, disk_index)
        return self.storage.iter_disk(name, snapshot=sid, chunk_bytes=chunk)
