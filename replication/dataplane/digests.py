"""Block digests of replica disks, read from the replica as it is, for resynchronization.

A resynchronization compares the source with the replica itself, never with a record of
what was sent. The digests are those of ``mobility.checksums`` (the agent computes the
source's with the same functions): 16 bytes of BLAKE3 per 4 KiB block, and per 64 KiB group
16 bytes of BLAKE3 over its blocks' digests.

The exchange, through cache storage:

* ``replicas/<item>/digests/request.json`` (``{"min_seq": N}``): written by the process
  server when an agent asks for digests computed at an applied seq of at least N that
  storage does not hold yet.
* The worker that applies the item's logs (holding its apply lease, so nothing writes the
  disks meanwhile) answers it after an apply pass once the replica has applied N
  (``digest_request_answer``): it reads every replica disk, puts
  ``replicas/<item>/digests/<disk index>.bin`` and deletes the request.
* The object: a header (``HEADER``: magic, format, applied seq it was computed at, disk
  size, block size) followed by the raw 16-byte block digests, one per 4 KiB block.

No Django here: the process server and the workers both use it.
"""
from __future__ import annotations

import json
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Mapping

from mobility.checksums import FINE_BYTES, FINE_DIGEST_BYTES, GROUP_BLOCKS, GROUP_BYTES, fine_digests, group_digests

from .storage import ObjectNotFound, Storage

MAGIC = b"LBDG"
FORMAT = 1
HEADER = struct.Struct("<4sHHQQI")  # magic, format, reserved, applied seq, disk size, block bytes
READ_PIECE = 8 * 1024 * 1024  # replica disks are read in pieces of this size (whole groups) ...
READ_AHEAD = 4  # ... with up to this many reads in flight
MAX_GROUPS_PER_REQUEST = 4096  # a block-digest answer is at most 1 MiB

__all__ = ["FINE_BYTES", "FINE_DIGEST_BYTES", "GROUP_BLOCKS", "GROUP_BYTES", "DigestObject", "DigestError",
           "digest_key", "request_key", "disk_block_digests", "encode_object", "decode_object",
           "blocks_of_groups", "parse_groups", "digest_request_read", "digest_request_write",
           "digest_request_answer", "fine_digests", "group_digests"]


class DigestError(ValueError):
    """Malformed digest input (an object, a request or a list of groups); the message says what."""


@dataclass(frozen=True)
class DigestObject:
    applied_seq: int
    disk_size: int
    blocks: bytes  # 16-byte digest of every 4 KiB block, in disk order

    @property
    def block_count(self) -> int:
        return len(self.blocks) // FINE_DIGEST_BYTES

    @property
    def group_count(self) -> int:
        return -(-self.block_count // GROUP_BLOCKS)

    def groups(self) -> bytes:
        return group_digests(self.blocks)


def digest_key(item_id: uuid.UUID | str, disk_index: int) -> str:
    return f"replicas/{uuid.UUID(str(item_id))}/digests/{int(disk_index)}.bin"


def request_key(item_id: uuid.UUID | str) -> str:
    return f"replicas/{uuid.UUID(str(item_id))}/digests/request.json"


def disk_block_digests(storage: Storage, name: str, *, piece_bytes: int = READ_PIECE) -> tuple[int, bytes]:
    """(size, block digests) of a replica disk as it is now, read in large pieces."""
    if piece_bytes <= 0 or piece_bytes % GROUP_BYTES:
        raise DigestError(f"piece_bytes must be a positive multiple of {GROUP_BYTES}")
    size = storage.disk_size(name)
    pieces = [(offset, min(piece_bytes, size - offset)) for offset in range(0, size, piece_bytes)]
    out = []
    # The next pieces are read (I/O, without the GIL) while this one is hashed: a few reads
    # in flight at once, since a device (or Blob Storage) answers several faster than one
    # after the other.
    with ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="digest-read") as reader:
        ahead = [reader.submit(storage.read_disk, name, *piece) for piece in pieces[:READ_AHEAD]]
        for i in range(len(pieces)):
            data = ahead.pop(0).result()
            if i + READ_AHEAD < len(pieces):
                ahead.append(reader.submit(storage.read_disk, name, *pieces[i + READ_AHEAD]))
            out.append(fine_digests(data))
    return size, b"".join(out)


def encode_object(*, applied_seq: int, disk_size: int, blocks: bytes) -> bytes:
    if len(blocks) != -(-disk_size // FINE_BYTES) * FINE_DIGEST_BYTES:
        raise DigestError(f"{len(blocks)} bytes of digests do not cover a disk of {disk_size} bytes")
    return HEADER.pack(MAGIC, FORMAT, 0, applied_seq, disk_size, FINE_BYTES) + blocks


def decode_object(raw: bytes) -> DigestObject:
    if len(raw) < HEADER.size:
        raise DigestError(f"a digest object of {len(raw)} bytes is shorter than its header")
    magic, fmt, _reserved, applied_seq, disk_size, block_bytes = HEADER.unpack_from(raw)
    if magic != MAGIC or fmt != FORMAT or block_bytes != FINE_BYTES:
        raise DigestError(f"not a digest object of format {FORMAT} with {FINE_BYTES}-byte blocks")
    blocks = bytes(raw[HEADER.size:])
    if len(blocks) != -(-disk_size // FINE_BYTES) * FINE_DIGEST_BYTES:
        raise DigestError(f"a digest object for a disk of {disk_size} bytes holds {len(blocks)} bytes of digests")
    return DigestObject(applied_seq, disk_size, blocks)


def blocks_of_groups(obj: DigestObject, groups: Iterable[int]) -> bytes:
    """The block digests of the given groups, concatenated in the order given (the last
    group of a disk may hold fewer than ``GROUP_BLOCKS``)."""
    step = GROUP_BLOCKS * FINE_DIGEST_BYTES
    out = []
    for g in groups:
        if not 0 <= g < obj.group_count:
            raise DigestError(f"group {g} is outside the disk's groups 0..{obj.group_count - 1}")
        out.append(obj.blocks[g * step : (g + 1) * step])
    return b"".join(out)


def parse_groups(text: str, *, group_count: int, limit: int = MAX_GROUPS_PER_REQUEST) -> list[int]:
    """``"a-b,c,..."`` (ascending, not overlapping, inside the disk) as a list of groups."""
    if not text or len(text) > 64 * 1024:
        raise DigestError("groups must be a non-empty list like 0-3,7")
    out: list[int] = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or len(first) > 12 or len(last) > 12:
            raise DigestError(f"{part!r} is not a group or a range of groups (like 7 or 0-3)")
        a, b = int(first), int(last) if dash else int(first)
        if b < a or (out and a <= out[-1]):
            raise DigestError(f"groups must be ascending and not overlap ({part!r})")
        if b >= group_count:
            raise DigestError(f"group {b} is outside the disk's groups 0..{group_count - 1}")
        if len(out) + (b - a + 1) > limit:
            raise DigestError(f"at most {limit} groups per request")
        out.extend(range(a, b + 1))
    return out


def format_groups(groups: Iterable[int]) -> str:
    """The inverse of ``parse_groups``: ascending groups as ``"a-b,c"``."""
    parts: list[str] = []
    run: list[int] = []
    for g in groups:
        if run and g == run[1] + 1:
            run[1] = g
            continue
        if run:
            parts.append(f"{run[0]}-{run[1]}" if run[1] > run[0] else str(run[0]))
        run = [g, g]
    if run:
        parts.append(f"{run[0]}-{run[1]}" if run[1] > run[0] else str(run[0]))
    return ",".join(parts)


def digest_request_read(storage: Storage, item_id: uuid.UUID | str) -> int | None:
    """The min_seq asked for, or None when nothing is asked (a malformed request is None)."""
    try:
        raw = storage.get_object(request_key(item_id))
    except ObjectNotFound:
        return None
    try:
        value = json.loads(raw)
        seq = int(value["min_seq"])
    except (ValueError, KeyError, TypeError):
        return None
    return seq if seq >= 0 else None


def digest_request_write(storage: Storage, item_id: uuid.UUID | str, min_seq: int) -> None:
    """Ask for the replica's digests at an applied seq of at least ``min_seq`` (a request
    already there for as much or more is kept)."""
    have = digest_request_read(storage, item_id)
    if have is not None and have >= min_seq:
        return
    storage.put_object(request_key(item_id), json.dumps({"min_seq": int(min_seq)}).encode())


def digest_request_answer(storage: Storage, *, item_id: uuid.UUID | str, disks: Mapping[int, str],
                          applied_seq: int) -> bool:
    """The worker's part, called under the item's apply lease after an apply pass: when a
    request is there and the replica has applied its min_seq, compute every disk's block
    digests from the live disk, put the objects, then delete the request. True if it did."""
    wanted = digest_request_read(storage, item_id)
    if wanted is None or applied_seq < wanted:
        return False
    for index, name in sorted(disks.items()):
        size, blocks = disk_block_digests(storage, name)
        storage.put_object(digest_key(item_id, index), encode_object(applied_seq=applied_seq, disk_size=size,
                                                                     blocks=blocks))
    if digest_request_read(storage, item_id) == wanted:  # a newer request waits for a newer seq
        storage.delete_object(request_key(item_id))
    return True
