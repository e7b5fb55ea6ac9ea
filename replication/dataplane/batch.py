"""The batch on the data plane's side: decoding and validating what agents ship.

The format (header, records, flags, limits) and its encoder are defined once, in
``mobility.wire`` (the agent is standalone, so the definition lives with it); this module
re-exports them under the names the data plane uses and adds what only the receiving side
needs: ``peek_header``, ``decode`` and the ``StreamValidator`` the process server checks a
body with while it streams it to disk.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator

from mobility.checksums import crc32
from mobility.wire import (
    FLAG_FROZEN_END,
    FLAG_INITIAL,
    FLAG_INITIAL_DONE,
    FLAG_RESYNC,
    FLAG_UNFROZEN,
    HEADER,
    KIND_BOOKMARK,
    KIND_DISK,
    KIND_WRITE,
    KINDS,
    KNOWN_FLAGS,
    MAGIC,
    MAX_BATCH_BYTES,
    MAX_BOOKMARK_BYTES,
    MAX_DISKS,
    RECORD,
    SECTOR,
    VERSION,
    MalformedBatch,
    Record,
    check_record,
)
from mobility.wire import encode as encode_parts

__all__ = [
    "FLAG_FROZEN_END", "FLAG_INITIAL", "FLAG_INITIAL_DONE", "FLAG_RESYNC", "FLAG_UNFROZEN", "HEADER", "KIND_BOOKMARK",
    "KIND_DISK", "KIND_WRITE", "KINDS", "KNOWN_FLAGS", "MAGIC", "MAX_BATCH_BYTES", "MAX_BOOKMARK_BYTES", "MAX_DISKS",
    "RECORD", "SECTOR", "VERSION", "Batch", "BatchInfo", "MalformedBatch", "Record", "StreamValidator", "decode",
    "encode", "iter_writes", "peek_header",
]


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
    """Encode a batch as one buffer (``mobility.wire.encode``, joined); raises MalformedBatch
    for records that could never be decoded."""
    encoded = encode_parts(item_id=item_id, seq=seq, source_time_ns=source_time_ns, records=list(records), flags=flags)
    return b"".join(encoded.parts)


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
        check_record(kind, disk, offset, length, index=i + 1)
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
                check_record(kind, disk, offset, length, index=self._index)
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
