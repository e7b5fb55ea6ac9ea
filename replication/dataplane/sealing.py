"""Sealing: how replication data rests in cache storage.

A sealed object is ``magic "LBS1" | version u8 | reserved u8x3 | plain_len u64 |
nonce (12 bytes)`` followed by the AES-256-GCM ciphertext (with its 16-byte tag) of the
zstd-compressed plaintext. The header and a caller-given context (the object's item and
sequence number) are authenticated as associated data, so an object moved to another item
or position, truncated or altered in any byte fails to open.
"""
from __future__ import annotations

import os
import struct

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"LBS1"
VERSION = 1
HEADER = struct.Struct("<4sB3xQ12s")
KEY_BYTES = 32
MAX_PLAIN_BYTES = 64 * 1024 * 1024


class TamperedData(ValueError):
    """A sealed object failed authentication or is malformed; it must not be applied."""


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal(plain: bytes | memoryview, *, key: bytes, context: bytes, level: int = 1) -> bytes:
    return b"".join(seal_parts(plain, key=key, context=context, level=level))


def seal_parts(plain: bytes | memoryview, *, key: bytes, context: bytes, level: int = 1) -> tuple[bytes, bytes]:
    """The sealed object as (header, ciphertext with its tag), to be written one after the
    other without joining them in memory first."""
    if len(plain) > MAX_PLAIN_BYTES:
        raise ValueError(f"{len(plain)} bytes is over the {MAX_PLAIN_BYTES}-byte sealing limit")
    compressed = zstandard.ZstdCompressor(level=level).compress(plain)
    nonce = os.urandom(12)
    header = HEADER.pack(MAGIC, VERSION, len(plain), nonce)
    return header, AESGCM(key).encrypt(nonce, compressed, header + context)


def unseal(blob: bytes | memoryview, *, key: bytes, context: bytes) -> bytes:
    if len(blob) < HEADER.size + 16:
        raise TamperedData("sealed object is truncated")
    magic, version, plain_len, nonce = HEADER.unpack_from(blob, 0)
    if magic != MAGIC or version != VERSION:
        raise TamperedData("not a Lifeboat sealed object")
    if plain_len > MAX_PLAIN_BYTES:
        raise TamperedData("sealed object claims an impossible size")
    header = bytes(blob[: HEADER.size])
    try:
        compressed = AESGCM(key).decrypt(nonce, memoryview(blob)[HEADER.size :], header + context)
    except InvalidTag:
        raise TamperedData("sealed object failed authentication (tampered, truncated or wrong key/context)") from None
    plain = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=plain_len)
    if len(plain) != plain_len:
        raise TamperedData("sealed object decompressed to the wrong size")
    return plain
