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
import threading
from typing import Callable

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .buffers import BufferPool, Held

MAGIC = b"LBS1"
VERSION = 1
HEADER = struct.Struct("<4sB3xQ12s")
KEY_BYTES = 32
TAG_BYTES = 16
MAX_PLAIN_BYTES = 64 * 1024 * 1024


_local = threading.local()  # per thread: a zstd context reused from object to object


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor()
    return dctx


class TamperedData(ValueError):
    """A sealed object failed authentication or is malformed; it must not be applied."""


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal(plain: bytes | memoryview, *, key: bytes, context: bytes, level: int = 1) -> bytes:
    return bytes(seal_into(plain, key=key, context=context, level=level, buffer=lambda n: memoryview(bytearray(n))))


def seal_into(plain: bytes | memoryview, *, key: bytes, context: bytes, level: int = 1,
              buffer: Callable[[int], memoryview]) -> memoryview:
    """Seal ``plain`` into a caller's buffer: ``buffer(n)`` returns a writable view of at
    least ``n`` bytes (``n`` is known once the plaintext is compressed) and the sealed object
    is written at its start, the ciphertext in place; returns the view of the object."""
    if len(plain) > MAX_PLAIN_BYTES:
        raise ValueError(f"{len(plain)} bytes is over the {MAX_PLAIN_BYTES}-byte sealing limit")
    compressed = _compressor(level).compress(plain)
    nonce = os.urandom(12)
    header = HEADER.pack(MAGIC, VERSION, len(plain), nonce)
    size = HEADER.size + len(compressed) + TAG_BYTES
    out = buffer(size)[:size]
    out[: HEADER.size] = header
    AESGCM(key).encrypt_into(nonce, compressed, header + context, out[HEADER.size :])
    return out


def unseal(blob: bytes | memoryview, *, key: bytes, context: bytes, buffers: BufferPool | None = None) -> bytes:
    """The plaintext of a sealed object; ``TamperedData`` unless it authenticates. With
    ``buffers``, the compressed bytes are decrypted into a buffer of that pool."""
    if len(blob) < HEADER.size + TAG_BYTES:
        raise TamperedData("sealed object is truncated")
    magic, version, plain_len, nonce = HEADER.unpack_from(blob, 0)
    if magic != MAGIC or version != VERSION:
        raise TamperedData("not a Lifeboat sealed object")
    if plain_len > MAX_PLAIN_BYTES:
        raise TamperedData("sealed object claims an impossible size")
    header = bytes(blob[: HEADER.size])
    ciphertext = memoryview(blob)[HEADER.size :]
    held = None
    try:
        try:
            if buffers is None:
                compressed = AESGCM(key).decrypt(nonce, ciphertext, header + context)
            else:
                size = len(ciphertext) - TAG_BYTES
                held = Held(buffers.take(size), size, buffers)
                AESGCM(key).decrypt_into(nonce, ciphertext, header + context, held.view)
                compressed = held.view
        except InvalidTag:
            raise TamperedData(
                "sealed object failed authentication (tampered, truncated or wrong key/context)") from None
        plain = _decompressor().decompress(compressed, max_output_size=plain_len)
    finally:
        ciphertext.release()
        if held is not None:
            held.release()
    if len(plain) != plain_len:
        raise TamperedData("sealed object decompressed to the wrong size")
    return plain
