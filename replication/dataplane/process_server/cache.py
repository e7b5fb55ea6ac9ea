"""The process server's cache directory: per-item state, the uploaded-seq marker, recovery.

Cache directory layout::

    tls/cert.pem tls/key.pem tls/thumbprint   self-signed certificate made on first start
    tmp/                                       sealed batches not yet acknowledged (emptied at start)
    items/<item_id>/<seq:020d>.lbs             acknowledged batches (sealed) not yet uploaded
    items/<item_id>/uploaded                   highest seq put into storage (two in-place slots)
    server.json                                pid, port and thumbprint of the running server

After a crash at any moment the cache directory alone says what was acknowledged
(``uploaded`` plus the batch files still cached): ``recover_items`` rebuilds the items'
state from it.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import uuid
import zlib
from dataclasses import dataclass, field

from mobility.durable import TEMP_PREFIX, replace_durably
from replication.dataplane.process_server.config import OBJECT_SUFFIX

log = logging.getLogger("lifeboat.process_server")


@dataclass
class Item:
    """A protected item's place in its stream on this server (fields guarded by the
    server's lock, unless a comment says otherwise)."""

    id: uuid.UUID
    dir: str
    acked: int = 0  # highest seq durably cached or uploaded
    uploaded: int = 0  # highest seq put into storage and recorded so (the marker)
    put: int = 0  # highest seq put into storage (puts of an item are made in seq order)
    pending: dict[int, int] = field(default_factory=dict)  # seq -> size, cached, not yet uploaded
    claimed: set[int] = field(default_factory=set)  # seqs an uploader is putting
    receiving: dict[int, int] = field(default_factory=dict)  # seq -> requests receiving it
    # Since this server started: batch bytes acknowledged, sealed bytes put into storage.
    received_bytes: int = 0
    uploaded_bytes: int = 0
    dir_made: bool = False
    # The item's place in its stream was checked against storage (``stream_floor``): until
    # then nothing of it is acknowledged, reported or uploaded.
    floor_checked: bool = False
    lost: bool = False  # its cache folder vanished under the running server (see _cache_lost)
    floor_lock: threading.Lock = field(default_factory=threading.Lock)
    commit_lock: threading.Lock = field(default_factory=threading.Lock)
    marker_lock: threading.Lock = field(default_factory=threading.Lock)
    marker: SeqMarker | None = None

    def cached_path(self, seq: int) -> str:
        """Where the item's acknowledged batch ``seq`` waits, sealed, for its upload."""
        return os.path.join(self.dir, f"{seq:020d}{OBJECT_SUFFIX}")


class SeqMarker:
    """A seq kept durably in a tiny file of two 512-byte slots (seq, generation, crc32),
    overwritten in place with fdatasync: no rename, so no filesystem journal commit (which
    on ext4 would wait for other files' dirty data). A torn write fails its checksum and the
    other slot still holds the previous seq."""

    SLOT = 512
    FORMAT = struct.Struct("<QQI")

    def __init__(self, path: str) -> None:
        self.path = path
        self.seq, self._gen, self._next = 0, 0, 0
        self._fd: int | None = None
        try:
            with open(path, "rb") as f:
                data = f.read(2 * self.SLOT)
        except FileNotFoundError:
            return
        best = None
        for i in (0, 1):
            chunk = data[i * self.SLOT : i * self.SLOT + self.FORMAT.size]
            if len(chunk) == self.FORMAT.size:
                seq, gen, crc = self.FORMAT.unpack(chunk)
                if crc == zlib.crc32(chunk[:16]) and (best is None or gen > best[1]):
                    best = (seq, gen, i)
        if best is not None:
            self.seq, self._gen, self._next = best[0], best[1], 1 - best[2]

    def write(self, seq: int) -> None:
        if self._fd is None:
            if not os.path.exists(self.path):
                replace_durably(self.path, bytes(2 * self.SLOT), mode=0o600)
            self._fd = os.open(self.path, os.O_WRONLY)
        self._gen += 1
        head = struct.pack("<QQ", seq, self._gen)
        os.pwrite(self._fd, head + struct.pack("<I", zlib.crc32(head)), self._next * self.SLOT)
        os.fdatasync(self._fd)
        self.seq, self._next = seq, 1 - self._next

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None



def recover_items(items_dir: str, tmp_dir: str) -> dict[uuid.UUID, Item]:
    """The per-item state the cache directory holds, after a start or a crash: batches not
    acknowledged (``tmp_dir``) and temporary files are removed, batches already uploaded
    too; the rest waits for its upload."""
    for name in os.listdir(tmp_dir):
        os.unlink(os.path.join(tmp_dir, name))
    items: dict[uuid.UUID, Item] = {}
    for name in os.listdir(items_dir):
        try:
            item_id = uuid.UUID(name)
        except ValueError:
            continue
        item = Item(item_id, os.path.join(items_dir, name), dir_made=True)
        item.marker = SeqMarker(os.path.join(item.dir, "uploaded"))
        item.uploaded = item.put = item.marker.seq
        for entry in os.listdir(item.dir):
            path = os.path.join(item.dir, entry)
            if entry.startswith(TEMP_PREFIX) or entry.endswith(".tmp"):  # ".tmp": older servers' temp files
                os.unlink(path)
            elif entry.endswith(OBJECT_SUFFIX) and entry[: -len(OBJECT_SUFFIX)].isdigit():
                seq = int(entry[: -len(OBJECT_SUFFIX)])
                if seq <= item.uploaded:
                    os.unlink(path)
                else:
                    item.pending[seq] = os.path.getsize(path)
        item.acked = max([item.uploaded, *item.pending])
        expected = set(range(item.uploaded + 1, item.acked + 1))
        if set(item.pending) != expected:
            log.error("item %s: cached batches %s are not contiguous after seq %d",
                      item_id, sorted(expected - set(item.pending)), item.uploaded)
        items[item_id] = item
    return items
