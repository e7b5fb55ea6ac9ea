"""The batch: the unit an agent ships to its process server.

A batch belongs to one protected item (one stream for all the item's disks, so that a
recovery point cut between two batches is crash-consistent across disks) and carries
records in write order::

    header  magic "LBB1" | version u8 | flags u8 | reserved u16 | item uuid (16 bytes)
            | seq u64 | source_time_ns u64 | record_count u32 | body_crc32 u32
    record  kind u8 | disk u16 | offset u64 | length u32 | data[length]

``seq`` starts at 1 and grows by one per batch of an item. ``source_time_ns`` is the
source clock's time of the newest write the batch covers. Write records are sector
aligned. A bookmark record (no disk data) marks the position of an app-consistent
snapshot; its data is a small UTF-8 JSON label.
"""
from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator

from mobility.checksums import crc32

MAGIC = b"LBB1"
VERSION = 1
HEADER = struct.Struct("<4sBBH16sQQII")
RECORD = struct.Struct("<BHQI")
SECTOR = 512

KIND_WRITE = 1
KIND_BOOKMARK = 2
KINDS = (KIND_WRITE, KIND_BOOKMARK)

FLAG_INITIAL = 0x01  # part of the initial full copy
FLAG_INITIAL_DONE = 0x02  # the last batch of the initial full copy
FLAG_RESYNC = 0x04  # part of a resynchronization pass
KNOWN_FLAGS = FLAG_INITIAL | FLAG_INITIAL_DONE | FLAG_RESYNC

MAX_BATCH_BYTES = 32 * 1024 * 1024
MAX_BOOKMARK_BYTES = 4096
MAX_DISKS = 64


class MalformedBatch(ValueError):
    """The bytes are not a well-formed batch; the message says why."""


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    disk: int
    offset: int
    data: memoryview | bytes


@dataclass(frozen=True, slots=True)
class Batch:
    item_id: uuid.UUID
    seq: int
    source_time_ns: int
    flags: int
    records: list[Record]

    @property
    def data_bytes(self) -> int:
        return sum(len(r.data) for r in self.records if r.kind == KIND_WRITE)


def encode(
    *,
    item_id: uuid.UUID,
    seq: int,
    source_time_ns: int,
    records: Iterable[Record],
    flags: int = 0,
) -> bytes:
    """Encode a batch; raises MalformedBatch for records that could never be decoded."""
    parts: list[bytes | memoryview] = []
    count = 0
    crc = 0
    for rec in records:
        _check_record(rec.kind, rec.disk, rec.offset, len(rec.data))
        head = RECORD.pack(rec.kind, rec.disk, rec.offset, len(rec.data))
        crc = crc32(rec.data, crc32(head, crc))
        parts.append(head)
        parts.append(rec.data)
        count += 1
    if seq < 1:
        raise MalformedBatch("seq must be 1 or more")
    header = HEADER.pack(MAGIC, VERSION, flags, 0, item_id.bytes, seq, source_time_ns, count, crc)
    out = b"".join([header, *parts])
    if len(out) > MAX_BATCH_BYTES:
        raise MalformedBatch(f"batch of {len(out)} bytes is over the {MAX_BATCH_BYTES}-byte limit")
    return out


def peek_header(buf: bytes | memoryview) -> tuple[uuid.UUID, int, int, int, int]:
    """(item_id, seq, source_time_ns, flags, record_count) without reading the body."""
    if len(buf) < HEADER.size:
        raise MalformedBatch(f"batch is {len(buf)} bytes, shorter than its {HEADER.size}-byte header")
    magic, version, flags, _res, item, seq, t_ns, count, _crc = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise MalformedBatch("not a Lifeboat batch (bad magic)")
    if version != VERSION:
        raise MalformedBatch(f"unsupported batch version {version}")
    if flags & ~KNOWN_FLAGS:
        raise MalformedBatch(f"unknown batch flags {flags:#x}")
    if seq < 1:
        raise MalformedBatch("seq must be 1 or more")
    return uuid.UUID(bytes=item), seq, t_ns, flags, count


def decode(buf: bytes | memoryview, *, check_crc: bool = True) -> Batch:
    """Parse and fully validate a batch. Record data are zero-copy views into ``buf``.

    ``check_crc=False`` skips only the body checksum, for bytes whose integrity is already
    proven otherwise (a batch just unsealed: AES-GCM authenticated exactly the bytes the
    process server checked); every structural rule is still enforced."""
    if len(buf) > MAX_BATCH_BYTES:
        raise MalformedBatch(f"batch of {len(buf)} bytes is over the {MAX_BATCH_BYTES}-byte limit")
    item_id, seq, t_ns, flags, count = peek_header(buf)
    crc_expected = HEADER.unpack_from(buf, 0)[-1]
    view = memoryview(buf)
    pos = HEADER.size
    end = len(view)
    crc = 0
    records: list[Record] = []
    for i in range(count):
        if pos + RECORD.size > end:
            raise MalformedBatch(f"batch truncated in the header of record {i + 1} of {count}")
        kind, disk, offset, length = RECORD.unpack_from(view, pos)
        _check_record(kind, disk, offset, length, index=i + 1)
        data_start = pos + RECORD.size
        if data_start + length > end:
            raise MalformedBatch(f"batch truncated in the data of record {i + 1} of {count}")
        if check_crc:
            crc = crc32(view[data_start : data_start + length], crc32(view[pos:data_start], crc))
        records.append(Record(kind, disk, offset, view[data_start : data_start + length]))
        pos = data_start + length
    if pos != end:
        raise MalformedBatch(f"{end - pos} unexpected bytes after the last record")
    if check_crc and crc != crc_expected:
        raise MalformedBatch("batch checksum does not match its contents (corrupted in transit?)")
    return Batch(item_id=item_id, seq=seq, source_time_ns=t_ns, flags=flags, records=records)


def iter_writes(batch: Batch) -> Iterator[Record]:
    return (r for r in batch.records if r.kind == KIND_WRITE)


def _check_record(kind: int, disk: int, offset: int, length: int, index: int | None = None) -> None:
    where = f"record {index}: " if index else ""
    if kind not in KINDS:
        raise MalformedBatch(f"{where}unknown record kind {kind}")
    if disk >= MAX_DISKS:
        raise MalformedBatch(f"{where}disk index {disk} is out of range")
    if kind == KIND_WRITE:
        if length == 0:
            raise MalformedBatch(f"{where}empty write")
        if offset % SECTOR or length % SECTOR:
            raise MalformedBatch(f"{where}write at {offset}+{length} is not {SECTOR}-byte aligned")
    elif length > MAX_BOOKMARK_BYTES:
        raise MalformedBatch(f"{where}bookmark label of {length} bytes is too long")


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """What a validated batch declares, without its records."""

    item_id: uuid.UUID
    seq: int
    source_time_ns: int
    flags: int
    record_count: int
    size: int


class StreamValidator:
    """Validates a batch fed in pieces, by the same rules and with the same messages as
    ``decode``, while holding no more than one record header: the process server checks a
    body as it streams it to disk, so a batch never has to sit whole in memory.

    ``feed`` raises MalformedBatch as soon as the bytes so far cannot be a batch;
    ``finish`` raises it for a batch that ends early, has trailing bytes or a bad checksum.
    """

    def __init__(self) -> None:
        self._size = 0
        self._head = bytearray()  # bytes of the header or record header being collected
        self._info: tuple[uuid.UUID, int, int, int, int] | None = None
        self._crc_expected = 0
        self._crc = 0
        self._index = 0  # 1-based number of the record being read; 0 before the first
        self._data_left = 0  # bytes of the current record's data still to come
        self._trailing = 0

    @property
    def header(self) -> tuple[uuid.UUID, int, int, int, int] | None:
        """(item_id, seq, source_time_ns, flags, record_count) once the header has arrived."""
        return self._info

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
        self._size += len(view)
        if self._size > MAX_BATCH_BYTES:
            raise MalformedBatch(f"batch of more than {MAX_BATCH_BYTES} bytes is over the limit")
        pos, end = 0, len(view)
        while pos < end:
            if self._info is None:
                take = min(HEADER.size - len(self._head), end - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) == HEADER.size:
                    self._info = peek_header(bytes(self._head))
                    self._crc_expected = HEADER.unpack_from(self._head, 0)[-1]
                    self._head.clear()
                    self._index = 1
                continue
            count = self._info[4]
            if self._index > count:
                self._trailing += end - pos
                return
            if self._data_left:
                take = min(self._data_left, end - pos)
                self._crc = crc32(view[pos : pos + take], self._crc)
                self._data_left -= take
                pos += take
                if not self._data_left:
                    self._index += 1
                continue
            take = min(RECORD.size - len(self._head), end - pos)
            self._head += view[pos : pos + take]
            pos += take
            if len(self._head) == RECORD.size:
                kind, disk, offset, length = RECORD.unpack_from(self._head, 0)
                _check_record(kind, disk, offset, length, index=self._index)
                self._crc = crc32(self._head, self._crc)
                self._head.clear()
                if length:
                    self._data_left = length
                else:
                    self._index += 1

    def finish(self) -> BatchInfo:
        if self._info is None:
            raise MalformedBatch(
                f"batch is {self._size} bytes, shorter than its {HEADER.size}-byte header"
            )
        item_id, seq, t_ns, flags, count = self._info
        if self._index <= count:
            where = "data" if self._data_left else "header"
            raise MalformedBatch(f"batch truncated in the {where} of record {self._index} of {count}")
        if self._trailing:
            raise MalformedBatch(f"{self._trailing} unexpected bytes after the last record")
        if self._crc != self._crc_expected:
            raise MalformedBatch("batch checksum does not match its contents (corrupted in transit?)")
        return BatchInfo(item_id, seq, t_ns, flags, count, self._size)
