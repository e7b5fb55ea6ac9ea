"""The chunk map of a local-storage disk (``disk.map``, and a snapshot's ``<id>.map``).

A map holds the disk's size, its chunk size, the generation of every chunk (0: never
written) and the next generation to hand out, compressed and checksummed; a token, new on
every write of a live map, tells a handle whether another process changed the disk.
"""
from __future__ import annotations

import array
import struct
import sys
import zlib

from .base import StorageError

MAP_MAGIC = b"LBDM"
MAP_VERSION = 1
# magic | version u8 | kind u8 (0 live, 1 snapshot) | reserved u16 | chunk_bytes u32
# | size u64 | next_gen u64 | created_ns u64 | token u64 | chunk count u32 | body length u32
# followed by the zlib-compressed generations (u64 each) and a crc32 of everything before.
MAP_HEADER = struct.Struct("<4sBBHIQQQQII")
KIND_LIVE = 0
KIND_SNAPSHOT = 1


class ChunkMap:
    """A disk's chunk map: size, chunk size, generation per chunk, next generation."""

    __slots__ = ("chunk_bytes", "size", "next_gen", "created_ns", "token", "gens")

    def __init__(
        self, chunk_bytes: int, size: int, next_gen: int, created_ns: int, gens: array.array, token: int = 0
    ):
        self.chunk_bytes = chunk_bytes
        self.size = size
        self.next_gen = next_gen
        self.created_ns = created_ns
        self.token = token  # random, new on every write of a live manifest (see refresh)
        self.gens = gens

    def encode(self, kind: int) -> bytes:
        raw = self.gens if sys.byteorder == "little" else _swapped(self.gens)
        body = zlib.compress(raw.tobytes(), 1)
        head = MAP_HEADER.pack(
            MAP_MAGIC, MAP_VERSION, kind, 0, self.chunk_bytes, self.size, self.next_gen,
            self.created_ns, self.token, len(self.gens), len(body),
        )
        return head + body + struct.pack("<I", zlib.crc32(body, zlib.crc32(head)))

    @classmethod
    def decode(cls, buf: bytes, path: str) -> "ChunkMap":
        if len(buf) < MAP_HEADER.size + 4:
            raise StorageError(f"disk manifest {path} is truncated")
        magic, version, _kind, _r, chunk_bytes, size, next_gen, created_ns, token, count, body_len = (
            MAP_HEADER.unpack_from(buf, 0)
        )
        if magic != MAP_MAGIC or version != MAP_VERSION:
            raise StorageError(f"{path} is not a Lifeboat disk manifest")
        end = MAP_HEADER.size + body_len
        if len(buf) != end + 4:
            raise StorageError(f"disk manifest {path} has the wrong length")
        (crc,) = struct.unpack_from("<I", buf, end)
        if crc != zlib.crc32(buf[MAP_HEADER.size:end], zlib.crc32(buf[: MAP_HEADER.size])):
            raise StorageError(f"disk manifest {path} fails its checksum")
        gens = array.array("Q")
        gens.frombytes(zlib.decompress(buf[MAP_HEADER.size:end]))
        if sys.byteorder != "little":
            gens.byteswap()
        if len(gens) != count or count != -(-size // chunk_bytes):
            raise StorageError(f"disk manifest {path} has an inconsistent chunk count")
        return cls(chunk_bytes, size, next_gen, created_ns, gens, token)

    @classmethod
    def read(cls, path: str) -> "ChunkMap":
        with open(path, "rb") as f:
            return cls.decode(f.read(), path)

    @staticmethod
    def read_header(path: str) -> tuple[int, int]:
        """(next_gen, token) without reading the map."""
        with open(path, "rb") as f:
            head = f.read(MAP_HEADER.size)
        if len(head) < MAP_HEADER.size or head[:4] != MAP_MAGIC:
            raise StorageError(f"{path} is not a Lifeboat disk manifest")
        fields = MAP_HEADER.unpack(head)
        return fields[6], fields[8]

    def extent(self, idx: int) -> int:
        """Bytes of chunk ``idx`` inside the disk."""
        return min(self.chunk_bytes, self.size - idx * self.chunk_bytes)


def _swapped(a: array.array) -> array.array:
    b = array.array(a.typecode, a)
    b.byteswap()
    return b

