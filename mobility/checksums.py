"""The two checksums replication data carries, in one place for the agent and the data plane.

* ``crc32``: the batch body checksum of the wire format (the CRC-32 of zlib, ISO-HDLC
  polynomial), computed by ISA-L with carry-less multiplication: the same values as
  ``zlib.crc32`` at several times its speed, so the format is unchanged.
* ``block_digest``: what the agent's block map records of every block (BLAKE3, 32 bytes,
  one thread). A cryptographic hash, because a scan or a resync skips a block whose digest
  matches: a collision would leave a differing block unsent. BLAKE3 runs at about four times
  the speed of SHA-256 on the same core.
"""
from __future__ import annotations

from blake3 import blake3
from isal.isal_zlib import crc32

DIGEST_NAME = "blake3"
DIGEST_BYTES = 32

__all__ = ["DIGEST_BYTES", "DIGEST_NAME", "block_digest", "crc32"]


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    return blake3(data).digest()
