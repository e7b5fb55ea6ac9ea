"""Per-disk block map: the digest (``checksums.block_digest``, BLAKE3) of every block as the
agent last delivered it.

The map is what the checksum scan and the resynchronization compare against. A slot holds
the digest of the block's content in the replica, as far as the agent knows; all zeros
means "unknown" (never delivered, or changed since by journaled writes, or delivered in a
batch whose content the agent cannot be sure of), and such a block is always sent.

The map lives in a file of ``32 * blocks`` bytes next to the item's state, named after the
digest (``map_path``); changed slots are written in place and made durable (fdatasync)
before the agent records the acknowledgement that caused them. A map of another digest
(an older agent's SHA-256 map) is never compared with: it is removed and every block starts
unknown, so the next scan or resync sends each block once more.
"""
from __future__ import annotations

import glob
import os

from mobility.checksums import DIGEST_BYTES, DIGEST_NAME, block_digest

UNKNOWN = bytes(DIGEST_BYTES)


def map_path(directory: str, disk_index: int) -> str:
    """The block map of a disk, removing maps of the disk kept under another digest."""
    path = os.path.join(directory, f"blockmap-{disk_index}.{DIGEST_NAME}")
    for other in glob.glob(os.path.join(glob.escape(directory), f"blockmap-{disk_index}.*")):
        if other != path:
            os.unlink(other)
    return path


class BlockMap:
    def __init__(self, path: str, *, blocks: int) -> None:
        self.path = path
        self.blocks = blocks
        size = blocks * DIGEST_BYTES
        self._slots = bytearray(size)
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            self._slots[: min(len(data), size)] = data[:size]
        self._changed: set[int] = set()
        self._rewrite = not os.path.exists(path) or os.path.getsize(path) != size

    def get(self, block: int) -> bytes:
        start = block * DIGEST_BYTES
        return bytes(self._slots[start : start + DIGEST_BYTES])

    def set(self, block: int, value: bytes) -> None:
        start = block * DIGEST_BYTES
        if self._slots[start : start + DIGEST_BYTES] != value:
            self._slots[start : start + DIGEST_BYTES] = value
            self._changed.add(block)

    def forget(self, block: int) -> None:
        self.set(block, UNKNOWN)

    def forget_all(self) -> None:
        self._slots[:] = bytes(len(self._slots))
        self._rewrite = True

    def matches(self, block: int, value: bytes) -> bool:
        return value != UNKNOWN and self.get(block) == value

    def flush(self) -> None:
        self.take_changes()()

    def take_changes(self):
        """The changes so far, as a function that writes them durably (it may run in another
        thread while the map goes on changing)."""
        if not self._changed and not self._rewrite:
            return lambda: None
        path = self.path
        if self._rewrite:
            whole = bytes(self._slots)
            self._changed.clear()
            self._rewrite = False

            def write_whole() -> None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.ftruncate(fd, len(whole))
                    os.pwrite(fd, whole, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)

            return write_whole
        pieces = [(b * DIGEST_BYTES, self.get(b)) for b in sorted(self._changed)]
        self._changed.clear()

        def write_pieces() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for offset, value in pieces:
                    os.pwrite(fd, value, offset)
                os.fdatasync(fd)  # overwrites in place: no metadata to commit
            finally:
                os.close(fd)

        return write_pieces


def changed_blocks(disk_path: str, block_map: BlockMap, *, block_bytes: int) -> list[int]:
    """Blocks of the disk whose content differs from the map (a read-only checksum scan)."""
    out = []
    with open(disk_path, "rb", buffering=0) as f:
        buf = bytearray(block_bytes)
        view = memoryview(buf)
        for block in range(block_map.blocks):
            n = f.readinto(view)
            if not block_map.matches(block, block_digest(view[:n])):
                out.append(block)
    return out
