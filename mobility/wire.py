"""The agent's encoder of the replication batch format.

The format is defined by ``replication.dataplane.batch`` (the process server decodes with
it). The agent keeps its own encoder here so that it installs and runs alone, without the
vault's packages; tests/dataplane/test_agent.py checks, byte for byte, that both encode
the same batch and that the constants agree, so the two cannot drift apart unnoticed.

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

FLAG_INITIAL = 0x01
FLAG_INITIAL_DONE = 0x02
FLAG_RESYNC = 0x04

MAX_BATCH_BYTES = 32 * 1024 * 1024
MAX_BOOKMARK_BYTES = 4096
MAX_DISKS = 64


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


def encoded_size(records: list[Record]) -> int:
    return HEADER.size + sum(RECORD.size + len(r.data) for r in records)


def encode(*, item_id: uuid.UUID, seq: int, source_time_ns: int, records: list[Record], flags: int = 0) -> EncodedBatch:
    if seq < 1:
        raise ValueError("seq must be 1 or more")
    parts: list[bytes | memoryview] = [b""]
    crc = 0
    size = HEADER.size
    for rec in records:
        length = len(rec.data)
        if rec.disk >= MAX_DISKS:
            raise ValueError(f"disk index {rec.disk} is out of range")
        if rec.kind == KIND_WRITE and (not length or rec.offset % SECTOR or length % SECTOR):
            raise ValueError(f"write at {rec.offset}+{length} is empty or not {SECTOR}-byte aligned")
        if rec.kind == KIND_BOOKMARK and length > MAX_BOOKMARK_BYTES:
            raise ValueError(f"bookmark label of {length} bytes is too long")
        head = RECORD.pack(rec.kind, rec.disk, rec.offset, length)
        crc = crc32(rec.data, crc32(head, crc))
        parts.append(head)
        parts.append(rec.data)
        size += RECORD.size + length
    if size > MAX_BATCH_BYTES:
        raise ValueError(f"batch of {size} bytes is over the {MAX_BATCH_BYTES}-byte limit")
    parts[0] = HEADER.pack(MAGIC, VERSION, flags, 0, item_id.bytes, seq, source_time_ns, len(records), crc)
    return EncodedBatch(seq, parts, size)
