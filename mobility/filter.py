"""The write filter: every write to a protected disk is recorded, in order, in a journal.

The filter sits in the write path (in the simulated site it wraps the workload writer):
``WriteFilter(disk, journal_dir).write(offset, data)`` writes the disk and appends a record
to the journal. The journal is a directory of segment files ``NNNNNNNNNNNN.jnl``; the agent
reads closed segments (and the complete records of the open one) and deletes a segment once
its records are acknowledged. When the journal outgrows its cap (the agent has been away too
long) the filter stops journaling and leaves an ``OVERFLOW`` marker: the gap can no longer be
bridged and the disk needs resynchronization.

A filter that was not closed (the VM powered off hard, the writer killed) may have written a
disk block without journaling it (the disk is written first): the next filter on the disk
finds its ``WRITING`` marker and leaves ``OVERFLOW`` saying so, so the agent resynchronizes
the disk (compares it with the replica) instead of trusting the journal.

Record: ``seq u64 | offset u64 | length u32 | crc32 u32 | time_ns u64 | data[length]``.

Journal seqs of a disk grow by one per write and never repeat, also across restarts of the
filter (it continues from the last complete record), so a reader can tell a gap.

A write holds the journal's ``HOLD`` lock shared from before the disk is written until it
completes (``write`` returns). :func:`hold_writes` takes it exclusively on several disks at
once: writes in flight complete first, new ones wait, so the journals' last seqs are then a
cut that every completed write is inside of and every held write is after (the barrier of a
replication group's shared recovery point).
"""
from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from mobility.checksums import crc32

RECORD = struct.Struct("<QQIIQ")
SEGMENT_BYTES = 8 * 1024 * 1024
DEFAULT_CAP_BYTES = 2 * 1024 * 1024 * 1024
OVERFLOW = "OVERFLOW"
WRITING = "WRITING"  # present while a filter has the disk open
HOLD = "HOLD"  # lock file: shared by each write, exclusive while a barrier holds the disk's writes


@dataclass(frozen=True, slots=True)
class JournalRecord:
    seq: int
    offset: int
    data: bytes
    time_ns: int
    segment: int
    end: int = 0  # byte position just after this record in its segment


class WriteFilter:
    def __init__(self, disk_path: str, journal_dir: str, *, cap_bytes: int = DEFAULT_CAP_BYTES,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.disk_path = disk_path
        self.journal_dir = journal_dir
        self.cap_bytes = cap_bytes
        self.segment_bytes = segment_bytes
        os.makedirs(journal_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._disk = open(disk_path, "r+b")
        segments = list_segments(journal_dir)
        self._segment_no = segments[-1] + 1 if segments else 1
        self._seq = _last_seq(journal_dir, segments)
        self._segment = None
        self._segment_size = 0
        # Bytes journaled as far as this filter knows; the agent only ever deletes segments,
        # so this is never below the real size and is re-measured only near the cap.
        self._journal_bytes = journal_bytes(journal_dir)
        marker = os.path.join(journal_dir, WRITING)
        if os.path.exists(marker):
            with open(os.path.join(journal_dir, OVERFLOW), "w") as f:
                f.write("the disk's last writer stopped without closing its write journal (a hard power-off or a "
                        "crash): a write may have reached the disk without being journaled")
        open(marker, "w").close()
        self._hold = os.open(os.path.join(journal_dir, HOLD), os.O_RDWR | os.O_CREAT, 0o600)

    @property
    def overflowed(self) -> bool:
        return os.path.exists(os.path.join(self.journal_dir, OVERFLOW))

    def write(self, offset: int, data: bytes) -> None:
        """Write and journal; returns (completes) only when no barrier holds the disk."""
        fcntl.flock(self._hold, fcntl.LOCK_SH)
        try:
            self._write(offset, data)
        finally:
            fcntl.flock(self._hold, fcntl.LOCK_UN)

    def _write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._disk.seek(offset)
            self._disk.write(data)
            self._disk.flush()
            if self.overflowed:
                if self._segment is not None:
                    # Journaling resumes in a fresh segment, so that the agent can drop this
                    # one (all of it stale once the resync starts) like any other.
                    self._segment.close()
                    self._segment = None
                return
            need = RECORD.size + len(data)
            if self._journal_bytes + need > self.cap_bytes:
                self._journal_bytes = journal_bytes(self.journal_dir)
                if self._journal_bytes + need > self.cap_bytes:
                    open(os.path.join(self.journal_dir, OVERFLOW), "w").close()
                    if self._segment is not None:
                        self._segment.close()
                        self._segment = None
                    return
            if self._segment is None or self._segment_size >= self.segment_bytes:
                self._roll()
            self._seq += 1
            rec = RECORD.pack(self._seq, offset, len(data), crc32(data), time.time_ns())
            self._segment.write(rec)
            self._segment.write(data)
            self._segment.flush()
            self._segment_size += need
            self._journal_bytes += need

    def _roll(self) -> None:
        if self._segment is not None:
            self._segment.close()
        path = os.path.join(self.journal_dir, f"{self._segment_no:012d}.jnl")
        self._segment = open(path, "ab")
        self._segment_no += 1
        self._segment_size = 0

    def close(self) -> None:
        with self._lock:
            if self._segment is not None:
                self._segment.close()
                self._segment = None
            self._disk.close()
            if self._hold >= 0:
                os.close(self._hold)
                self._hold = -1
            try:
                os.unlink(os.path.join(self.journal_dir, WRITING))
            except FileNotFoundError:
                pass


class HoldTimeout(Exception):
    """A disk's writes could not be held in time (a write stuck in flight, a hung writer)."""


class WriteHold:
    """Writes held on some disks (see :func:`hold_writes`); ``release()`` lets them go on."""

    def __init__(self, fds: dict[str, int]) -> None:
        self._fds = fds

    def positions(self) -> dict[str, int]:
        """Per journal directory, the last journaled seq: every completed write is at or below it."""
        return {d: last_seq(d) for d in self._fds}

    def release(self) -> None:
        for fd in self._fds.values():
            os.close(fd)  # releases the lock
        self._fds = {}

    def __enter__(self) -> "WriteHold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_writes(journal_dirs: Sequence[str], *, timeout: float) -> WriteHold:
    """Hold the completion of new writes on every disk (writes in flight complete first).
    Raises :class:`HoldTimeout`, holding nothing, if a disk is not held within ``timeout``."""
    fds: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    try:
        for journal_dir in journal_dirs:
            os.makedirs(journal_dir, exist_ok=True)
            fd = fds[journal_dir] = os.open(os.path.join(journal_dir, HOLD), os.O_RDWR | os.O_CREAT, 0o600)
            if not lock_exclusive_by(fd, deadline, poll=0.001):
                raise HoldTimeout(f"the writes of {journal_dir} were not held within {timeout:g}s")
    except BaseException:
        WriteHold(fds).release()
        raise
    return WriteHold(fds)


def lock_exclusive_by(fd: int, deadline: float, *, poll: float) -> bool:
    """Take ``fd``'s exclusive flock, trying until ``deadline`` (``time.monotonic()``); False
    if it is still taken then. A lock is tried without blocking so a wait never outlives the
    deadline."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)


def list_segments(journal_dir: str) -> list[int]:
    try:
        names = os.listdir(journal_dir)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-4]) for n in names if n.endswith(".jnl") and n[:-4].isdigit())


def journal_bytes(journal_dir: str) -> int:
    total = 0
    for no in list_segments(journal_dir):
        try:
            total += os.path.getsize(os.path.join(journal_dir, f"{no:012d}.jnl"))
        except FileNotFoundError:
            pass
    return total


def read_journal(
    journal_dir: str, *, after_seq: int = 0, position: tuple[int, int] | None = None
) -> Iterator[JournalRecord]:
    """Complete records with seq > after_seq, oldest first; a torn tail is not yielded.

    ``position`` (a record's ``(segment, end)``) lets a reader that already consumed the
    journal up to there start at once instead of re-reading older records; records at or
    below ``after_seq`` are skipped without reading their data.
    """
    for no in list_segments(journal_dir):
        if position is not None and no < position[0]:
            continue
        path = os.path.join(journal_dir, f"{no:012d}.jnl")
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue
        with f:
            pos = 0
            if position is not None and no == position[0]:
                pos = f.seek(position[1])
            while True:
                head = f.read(RECORD.size)
                if len(head) < RECORD.size:
                    break
                seq, offset, length, crc, t_ns = RECORD.unpack(head)
                if seq <= after_seq:
                    pos = f.seek(length, os.SEEK_CUR)
                    continue
                data = f.read(length)
                if len(data) < length or crc32(data) != crc:
                    break
                pos += RECORD.size + length
                yield JournalRecord(seq, offset, data, t_ns, no, pos)


def drop_segments_through(journal_dir: str, *, acked_seq: int) -> None:
    """Delete every segment all of whose records are acknowledged (seq <= acked_seq)."""
    segments = list_segments(journal_dir)
    for no in segments[:-1]:  # never the newest: the filter may still be appending to it
        path = os.path.join(journal_dir, f"{no:012d}.jnl")
        last = _segment_last_seq(path)
        if last is not None and last <= acked_seq:
            os.unlink(path)


def last_seq(journal_dir: str) -> int:
    """The seq of the newest complete record in the journal (0 for an empty journal)."""
    return _last_seq(journal_dir, list_segments(journal_dir))


def end_position(
    journal_dir: str, *, start: tuple[int, tuple[int, int] | None] | None = None
) -> tuple[int, tuple[int, int] | None]:
    """(seq, (segment, end)) of the newest complete record, or (0, None) for an empty journal.

    With ``start`` (an earlier answer) only what was appended since is read, which is what
    makes frequent polling cheap; if its segment is gone, the whole journal is read.
    """
    segments = list_segments(journal_dir)
    if start is not None and start[1] is not None and start[1][0] in segments:
        last, pos = start[0], start[1]
        for no in segments:
            if no < pos[0]:
                continue
            path = os.path.join(journal_dir, f"{no:012d}.jnl")
            found = _scan_segment(path, pos[1] if no == pos[0] else 0)
            if found is not None:
                last, pos = found[0], (no, found[1])
        return last, pos
    for no in reversed(segments):
        found = _scan_segment(os.path.join(journal_dir, f"{no:012d}.jnl"), 0)
        if found is not None:
            return found[0], (no, found[1])
    return 0, None


def _scan_segment(path: str, offset: int) -> tuple[int, int] | None:
    """(seq, end) of the last complete record header+data after ``offset``, if any."""
    last = None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            while True:
                head = f.read(RECORD.size)
                if len(head) < RECORD.size:
                    break
                seq, _o, length, _c, _t = RECORD.unpack(head)
                end = f.seek(length, os.SEEK_CUR)
                if end > size:
                    break
                last = (seq, end)
    except FileNotFoundError:
        return None
    return last


def overflowed(journal_dir: str) -> bool:
    return os.path.exists(os.path.join(journal_dir, OVERFLOW))


def overflow_reason(journal_dir: str) -> str:
    """Why the journal stopped: the marker's sentence (an unclean stop), else an overflow."""
    try:
        with open(os.path.join(journal_dir, OVERFLOW)) as f:
            return f.read().strip() or "the write journal overflowed: writes since are not journaled"
    except FileNotFoundError:
        return ""


def clear_overflow(journal_dir: str) -> None:
    """Let the filter journal again (the agent calls it when a resynchronization starts)."""
    try:
        os.unlink(os.path.join(journal_dir, OVERFLOW))
    except FileNotFoundError:
        pass


def backlog_bytes(journal_dir: str, position: tuple[int, int] | None) -> int:
    """Journal bytes after ``position`` (the end of the last acknowledged record)."""
    total = 0
    for no in list_segments(journal_dir):
        if position is not None and no < position[0]:
            continue
        try:
            size = os.path.getsize(os.path.join(journal_dir, f"{no:012d}.jnl"))
        except FileNotFoundError:
            continue
        if position is not None and no == position[0]:
            size = max(0, size - position[1])
        total += size
    return total


def _segment_last_seq(path: str) -> int | None:
    last = None
    try:
        with open(path, "rb") as f:
            while True:
                head = f.read(RECORD.size)
                if len(head) < RECORD.size:
                    break
                seq, _o, length, _c, _t = RECORD.unpack(head)
                f.seek(length, os.SEEK_CUR)
                last = seq
    except FileNotFoundError:
        return None
    return last


def _last_seq(journal_dir: str, segments: list[int]) -> int:
    for no in reversed(segments):
        last = _segment_last_seq(os.path.join(journal_dir, f"{no:012d}.jnl"))
        if last is not None:
            return last
    return 0
