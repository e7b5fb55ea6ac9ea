"""A small record kept durably in two alternating slots of one preallocated file.

The agent saves its item state before every batch it sends. Replacing a file (temp file,
fsync, rename, fsync of the directory) changes metadata, and on ext4 an fsync that has to
commit the journal also waits for other files' dirty data: under replication load that
took tens of milliseconds per save. Here a save overwrites the older of two fixed-size
slots in place and calls ``fdatasync``: no metadata changes, so no journal commit.

Slot: ``magic "LBST" | generation u64 | length u32 | crc32 u32 | payload``. A load takes the
valid slot with the higher generation; a save torn by a crash fails its checksum and the
other slot (the previous state) is used. A payload too big for the slots makes the file be
rewritten with bigger slots (the slow way, rarely).
"""
from __future__ import annotations

import os
import struct
import zlib

from mobility.durable import fsync_dir

MAGIC = b"LBST"
HEAD = struct.Struct("<4sQII")
MIN_SLOT = 64 * 1024


class SlotFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._slot = 0
        self._next = 0
        self._gen = 0
        self._payload: bytes | None = None
        if os.path.exists(path):
            self._load()

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        slot = len(data) // 2
        best = None
        for i in (0, 1):
            chunk = data[i * slot : (i + 1) * slot]
            if len(chunk) < HEAD.size:
                continue
            magic, gen, length, crc = HEAD.unpack_from(chunk, 0)
            payload = chunk[HEAD.size : HEAD.size + length]
            if magic == MAGIC and len(payload) == length and zlib.crc32(payload) == crc:
                if best is None or gen > best[0]:
                    best = (gen, i, payload)
        self._slot = slot
        if best is not None:
            self._gen, last, self._payload = best
            self._next = 1 - last
        else:
            self._next = 0

    def read(self) -> bytes | None:
        return self._payload

    def write(self, payload: bytes) -> None:
        need = HEAD.size + len(payload)
        if self._fd is None or need > self._slot:
            self._create(max(MIN_SLOT, 2 * need))
        self._gen += 1
        record = HEAD.pack(MAGIC, self._gen, len(payload), zlib.crc32(payload)) + payload
        os.pwrite(self._fd, record, self._next * self._slot)
        os.fdatasync(self._fd)
        self._payload = payload
        self._next = 1 - self._next

    def _create(self, slot: int) -> None:
        """(Re)make the file with slots of ``slot`` bytes holding the current payload, the
        crash-safe way (temp file, fsync, rename, fsync of the directory)."""
        if self._fd is None and os.path.exists(self.path) and self._slot >= slot:
            self._fd = os.open(self.path, os.O_RDWR)
            return
        tmp = self.path + ".new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        payload = self._payload or b""
        first = HEAD.pack(MAGIC, self._gen, len(payload), zlib.crc32(payload)) + payload
        os.pwrite(fd, first.ljust(slot, b"\0") + bytes(slot), 0)
        os.fsync(fd)
        os.replace(tmp, self.path)
        fsync_dir(os.path.dirname(self.path) or ".")
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._slot, self._next = fd, slot, 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
