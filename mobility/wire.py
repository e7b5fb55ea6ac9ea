"""The batch: the unit an agent ships to its process server. The one definition of its format.

A batch belongs to one protected item (one stream for all the item's disks, so that a
recovery point cut between two batches is crash-consistent across disks) and carries
records in write order::

    header  magic "LBB1" | version u8 | flags u8 | reserved u16 | item uuid (16 bytes)
            | seq u64 | source_time_ns u64 | record_count u32 | body_crc32 u32
    record  kind u8 | disk u16 | offset u64 | length u32 | data[length]

``seq`` starts at 1 and grows by one per batch of an item. ``source_time_ns`` is the
source clock's time of the newest write the batch covers. Write records are sector
aligned. A bookmark record (no disk data) marks the position of an app-consistent
snapshot; its data is a small UTF-8 JSON label. A disk record (no data) says that from here
on the stream's disk ``disk`` is ``offset`` bytes long (a disk that grew, was added, or, with
0, left the machine).

This module holds the format's constants, its record rules (``check_record``) and the
encoder; it is part of the agent, which installs and runs alone (standard library, isal and
blake3 only). The data plane's ``replication.dataplane.batch`` imports them from here and
adds the decoder and the streaming validator the process server checks bodies with.

The encoder does not join the batch into one buffer: it returns the pieces (headers and
zero-copy views of the record data) for the transport to send one after the other.
"""
from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from mobility.checksums import crc32

MAGIC = b"LBB1"
VERSION = 1
HEADER = struct.Struct("<4sBBH16sQQII")
RECORD = struct.Struct("<BHQI")
SECTOR = 512

KIND_WRITE = 1
KIND_BOOKMARK = 2
KIND_DISK = 3  # the disk's size from here on (0: the disk left the machine)
KINDS = (KIND_WRITE, KIND_BOOKMARK, KIND_DISK)

FLAG_INITIAL = 0x01  # part of the initial full copy
FLAG_INITIAL_DONE = 0x02  # the last batch of the initial full copy
FLAG_RESYNC = 0x04  # part of a resynchronization pass
FLAG_UNFROZEN = 0x08  # holds blocks of a disk scanned without a frozen view (read at different moments)
# The last batch of a scan pass that read frozen views of every scanned disk (taken together):
# with it the replica is one moment again.
FLAG_FROZEN_END = 0x10
KNOWN_FLAGS = FLAG_INITIAL | FLAG_INITIAL_DONE | FLAG_RESYNC | FLAG_UNFROZEN | FLAG_FROZEN_END

MAX_BATCH_BYTES = 32 * 1024 * 1024
MAX_BOOKMARK_BYTES = 4096
MAX_DISKS = 64


class MalformedBatch(ValueError):
    """The bytes (or records) are not a well-formed batch; the message says why."""


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    disk: int
    offset: int
    data: bytes | memoryview


@dataclass(slots=True)
class EncodedBatch:
    seq: int
    parts: list[bytes | memoryview]
    size: int


def check_record(kind: int, disk: int, offset: int, length: int, index: int | None = None) -> None:
    """Raise MalformedBatch for a record the format does not allow (``index``: its 1-based
    place in the batch, for the message)."""
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
    elif kind == KIND_DISK:
        if length or offset % SECTOR:
            raise MalformedBatch(f"{where}disk record of size {offset} with {length} bytes of data: it must be "
                                 f"whole {SECTOR}-byte sectors and carry no data")
    elif length > MAX_BOOKMARK_BYTES:
        raise MalformedBatch(f"{where}bookmark label of {length} bytes is too long")


def encoded_size(records: list[Record]) -> int:
    return HEADER.size + sum(RECORD.size + len(r.data) for r in records)


def encode(*, item_id: uuid.UUID, seq: int, source_time_ns: int, records: list[Record], flags: int = 0) -> EncodedBatch:
    """Encode a batch as pieces; raises MalformedBatch for records that could never be decoded."""
    if seq < 1:
        raise MalformedBatch("seq must be 1 or more")
    parts: list[bytes | memoryview] = [b""]
    crc = 0
    size = HEADER.size
    for rec in records:
        length = len(rec.data)
        check_record(rec.kind, rec.disk, rec.offset, length)
        head = RECORD.pack(rec.kind, rec.disk, rec.offset, length)
        crc = crc32(rec.data, crc32(head, crc))
        parts.append(head)
        parts.append(rec.data)
        size += RECORD.size + length
    if size > MAX_BATCH_BYTES:
        raise MalformedBatch(f"batch of {size} bytes is over the {MAX_BATCH_BYTES}-byte limit")
    parts[0] = HEADER.pack(MAGIC, VERSION, flags, 0, item_id.bytes, seq, source_time_ns, len(records), crc)
    return EncodedBatch(seq, parts, size)
