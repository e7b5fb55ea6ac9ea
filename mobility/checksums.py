"""The two checksums replication data carries, in one place for the agent and the data plane.

* ``crc32``: the batch body checksum of the wire format (the CRC-32 of zlib, ISO-HDLC
  polynomial), computed by ISA-L with carry-less multiplication: the same values as
  ``zlib.crc32`` at several times its speed, so the format is unchanged.
* ``block_digest``: what the agent's block map records of every block (BLAKE3, 32 bytes,
  one thread). A cryptographic hash, because a scan or a resync skips a block whose digest
  matches: a collision would leave a differing block unsent. BLAKE3 runs at about four times
  the speed of SHA-256 on the same core.
* ``fine_digests`` / ``group_digests``: what a resynchronization compares between the
  source and the replica. Every 4 KiB block (``FINE_BYTES``) has a 16-byte digest (BLAKE3,
  first 16 bytes); every 64 KiB group (``GROUP_BLOCKS`` blocks) a 16-byte digest of its
  blocks' digests. The agent computes them over the source, the replica side
  (``replication.dataplane.digests``) over the replica disk, with these same functions.
  The last block of a disk may be short, and the last group may hold fewer blocks.
"""
from __future__ import annotations

from blake3 import blake3
from isal.isal_zlib import crc32

DIGEST_NAME = "blake3"
DIGEST_BYTES = 32

FINE_BYTES = 4096
FINE_DIGEST_BYTES = 16
GROUP_BLOCKS = 16
GROUP_BYTES = FINE_BYTES * GROUP_BLOCKS

__all__ = ["DIGEST_BYTES", "DIGEST_NAME", "FINE_BYTES", "FINE_DIGEST_BYTES", "GROUP_BLOCKS", "GROUP_BYTES",
           "block_digest", "crc32", "fine_digests", "group_digests"]


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    return blake3(data).digest()


def fine_digests(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte digests of the consecutive 4 KiB blocks of ``data`` (the last one may be
    short), concatenated. ``data`` must start on a block boundary of its disk."""
    view = memoryview(data).cast("B")
    return b"".join([blake3(view[start : start + FINE_BYTES]).digest(FINE_DIGEST_BYTES)
                     for start in range(0, len(view), FINE_BYTES)])


def group_digests(fine: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte digests of consecutive groups of ``GROUP_BLOCKS`` block digests (the last
    group may hold fewer), concatenated. ``fine`` must start on a group boundary."""
    view = memoryview(fine).cast("B")
    if len(view) % FINE_DIGEST_BYTES:
        raise ValueError(f"{len(view)} bytes are not a whole number of {FINE_DIGEST_BYTES}-byte digests")
    step = GROUP_BLOCKS * FINE_DIGEST_BYTES
    return b"".join(blake3(view[start : start + step]).digest(FINE_DIGEST_BYTES)
                    for start in range(0, len(view), step))
