"""The process server: HTTPS ingest of replication batches from mobility agents.

An agent POSTs each batch of a protected item to ``/v1/items/<item_id>/batches`` with the
item's token. The server reads the body while it validates it (``batch.StreamValidator``: the
rules of ``batch.decode``, checked piece by piece as the bytes arrive, so a bad batch is
refused early), seals it (``sealing.seal_into``: zstd + AES-256-GCM with the vault's key and
context ``"<item_id>:<seq>"``), writes the sealed object to a temp file in its cache directory
(with O_DIRECT where the file system allows it, from a pooled buffer: ``buffers``), and
acknowledges ``{"acked_seq": n}`` only once the file is fsync'd, renamed into the item's
directory and that directory fsync'd. The bytes of batches being received and sealed at once
are capped (``ingest_memory_bytes``): memory stays bounded however many agents send.
Sequence numbers make a resent batch harmless: ``seq == acked + 1`` is accepted, an older
one is answered ``409 replayed_batch``, a newer one ``409 sequence_gap``, both with
``acked_seq`` and without touching anything stored.
An agent may have a few batches of an item in flight at once: a batch whose predecessor is
still arriving waits for it rather than being refused. A request's ``X-Lifeboat-Seq`` header
announces its batch before any of the body is read, and a predecessor nobody announced yet is
given ``GAP_GRACE_SECONDS`` to show up; the waiting batch is already durable in the cache's
temp directory and holds no memory and no ingest slot, so it never keeps its predecessor out.
``GET /v1/items/<item_id>`` (item token) answers ``acked_seq``, ``uploaded_seq`` and
``receiving_batches``; ``GET /v1/status`` (status token) the server's own figures;
``GET /v1/health`` needs no token.

A resynchronizing agent compares the source with the replica as it is (``digests``):
``GET /v1/items/<item_id>/digests/<disk>?min_seq=N`` (item token) answers 200 with the
disk's 64 KiB group digests (16 bytes each, ``application/octet-stream``; headers
``X-Lifeboat-Applied-Seq``, ``X-Lifeboat-Disk-Size``, ``X-Lifeboat-Block-Bytes``,
``X-Lifeboat-Group-Blocks`` describe them) once storage holds digests computed at an
applied seq of at least N; otherwise it leaves a request for the worker that applies the
item and answers 202 with ``Retry-After``. ``GET .../digests/<disk>/blocks?min_seq=N&groups=
a-b,c`` answers the 4 KiB block digests of those groups, in order, the same way. Malformed
parameters get 400 and write nothing.

Background uploader threads put the cached batches, already sealed, into cache storage as
``logs/<item_id>/<seq:020d>.lbs`` in seq order per item (``Storage.put_object_file``: a hard
link when the local storage shares the cache's file system, so the bytes are written once),
record the item's uploaded seq and then delete the cache file. The cache holds batches only
sealed, so what rests on the process server's disk is as protected as what rests in storage.
An item this server has no state for (new to it, or its cache lost) continues after what
storage holds (``apply.stream_floor``: the newest log, or the replica's applied seq), checked
again for items found in the cache at start, when an agent asks where its stream stands and
before a "sequence gap" answer: the numbering never goes back behind the replica, and an agent
that acknowledged more than the server now has learns that acknowledged data was lost.
After a crash at any moment the cache directory alone says what was acknowledged
(``uploaded`` plus the batch files still cached), so nothing acknowledged is lost, and
re-uploading an object that already exists is harmless.

Cache directory layout::

    tls/cert.pem tls/key.pem tls/thumbprint   self-signed certificate made on first start
    tmp/                                       sealed batches not yet acknowledged (emptied at start)
    items/<item_id>/<seq:020d>.lbs             acknowledged batches (sealed) not yet uploaded
    items/<item_id>/uploaded                   highest seq put into storage (two in-place slots)
    server.json                                pid, port and thumbprint of the running server

Run it with ``python -m replication.dataplane.process_server --config FILE`` or, in
process, ``ProcessServer(ServerConfig.from_dict(cfg)).start()``.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import http.server
import ipaddress
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from mobility.tuning import tune_allocator
from replication.dataplane import batch as batch_format
from replication.dataplane import buffers
from replication.dataplane import digests as replica_digests
from replication.dataplane import sealing
from replication.dataplane.apply import stream_floor
from replication.dataplane.auth import STATUS_SUBJECT, item_subject, verify_token
from replication.dataplane.storage import ObjectNotFound

log = logging.getLogger("lifeboat.process_server")

VERSION = "1.0"
DEFAULT_PORT = 9443
CHUNK_BYTES = 1024 * 1024
OBJECT_SUFFIX = ".lbs"  # in storage and in the cache alike: a cached batch is already sealed
DISK_FREE_MARGIN = 64 * 1024 * 1024
# A batch being sealed is held about three times at its peak: the body, the compressed
# bytes and the ciphertext.
SEAL_MEMORY_FACTOR = 3
GAP_GRACE_SECONDS = 1.0
DIGEST_RETRY_SECONDS = 1  # Retry-After while the replica's digests are being computed
DIGEST_CACHE_ENTRIES = 8  # digest objects kept in memory (the agent asks for slices of one)


class ConfigError(ValueError):
    """The process server configuration is unusable; the message says which field and why."""


@dataclass
class ServerConfig:
    cache_dir: str
    auth_key: bytes
    seal_key: bytes
    storage: dict
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    report_url: str | None = None
    report_token: str | None = None
    report_interval: float = 30.0
    max_cache_bytes: int = 16 * 1024**3
    upload_workers: int = 2
    max_ingest: int = 4
    max_connections: int = 64
    # memory for batches being received and sealed (the process server's bound, with about
    # 40 MiB for the rest of it); at least three maximum-size batches
    ingest_memory_bytes: int = SEAL_MEMORY_FACTOR * batch_format.MAX_BATCH_BYTES
    seal_level: int = 1
    io_timeout: float = 60.0
    # Ingest bandwidth this server accepts (bytes/s, 0 = as fast as it can): a sized
    # capacity, as a real process server has; churn above it builds backlog at the agents.
    max_ingest_bytes_per_s: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> "ServerConfig":
        def need(name: str) -> Any:
            if raw.get(name) in (None, ""):
                raise ConfigError(f"process server config: '{name}' is required")
            return raw[name]

        def key(name: str, length: int | None) -> bytes:
            try:
                value = base64.b64decode(need(name), validate=True)
            except (ValueError, TypeError):
                raise ConfigError(f"process server config: '{name}' is not valid base64") from None
            if length and len(value) != length:
                raise ConfigError(f"process server config: '{name}' must be {length} bytes, got {len(value)}")
            if len(value) < 16:
                raise ConfigError(f"process server config: '{name}' is shorter than 16 bytes")
            return value

        listen = str(raw.get("listen") or f"127.0.0.1:{DEFAULT_PORT}")
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"process server config: 'listen' must be HOST:PORT, got {listen!r}")
        storage = need("storage")
        if not isinstance(storage, dict) or "kind" not in storage:
            raise ConfigError("process server config: 'storage' must be an object with a 'kind'")
        cfg = cls(
            cache_dir=os.path.abspath(str(need("cache_dir"))),
            auth_key=key("auth_key", None),
            seal_key=key("seal_key", sealing.KEY_BYTES),
            storage=storage,
            host=host.strip("[]") or "127.0.0.1",
            port=int(port),
            report_url=raw.get("report_url") or None,
            report_token=raw.get("report_token") or None,
        )
        for name, typ in (
            ("report_interval", float),
            ("max_cache_bytes", int),
            ("upload_workers", int),
            ("max_ingest", int),
            ("max_connections", int),
            ("ingest_memory_bytes", int),
            ("seal_level", int),
            ("io_timeout", float),
            ("max_ingest_bytes_per_s", int),
        ):
            if raw.get(name) is not None:
                try:
                    setattr(cfg, name, typ(raw[name]))
                except (TypeError, ValueError):
                    raise ConfigError(f"process server config: '{name}' must be a number") from None
        if cfg.upload_workers < 1 or cfg.max_ingest < 1 or cfg.max_connections < 1:
            raise ConfigError("process server config: worker and connection counts must be 1 or more")
        if cfg.ingest_memory_bytes < SEAL_MEMORY_FACTOR * batch_format.MAX_BATCH_BYTES:
            raise ConfigError(
                "process server config: 'ingest_memory_bytes' must be at least "
                f"{SEAL_MEMORY_FACTOR * batch_format.MAX_BATCH_BYTES} (three maximum-size batches)"
            )
        if cfg.max_cache_bytes < batch_format.MAX_BATCH_BYTES:
            raise ConfigError(
                f"process server config: 'max_cache_bytes' must be at least {batch_format.MAX_BATCH_BYTES}"
            )
        return cfg


# --- durable file helpers ------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that after a crash it holds the old or new bytes."""
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        buffers.write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


# --- certificate -----------------------------------------------------------------------------


def thumbprint_of(cert_der: bytes) -> str:
    """The SHA-256 thumbprint agents pin: lowercase hex of the DER certificate's digest."""
    return hashlib.sha256(cert_der).hexdigest()


def ensure_certificate(tls_dir: str, *, host: str = "127.0.0.1") -> tuple[str, str, str]:
    """(cert_path, key_path, thumbprint); makes a self-signed certificate on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(tls_dir, exist_ok=True)
    cert_path = os.path.join(tls_dir, "cert.pem")
    key_path = os.path.join(tls_dir, "key.pem")
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"lifeboat-process-server {socket.gethostname()}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        alt: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_durably(key_path, key_pem, mode=0o600)
        write_durably(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    with open(cert_path, "rb") as f:
        der = ssl.PEM_cert_to_DER_cert(f.read().decode("ascii"))
    thumb = thumbprint_of(der)
    thumb_path = os.path.join(tls_dir, "thumbprint")
    if not os.path.exists(thumb_path):
        write_durably(thumb_path, (thumb + "\n").encode())
    return cert_path, key_path, thumb


# --- storage -----------------------------------------------------------------------------------


def open_target_storage(config: dict):
    """The vault's cache storage (``replication.dataplane.storage``)."""
    from replication.dataplane.storage import StorageError, open_storage

    try:
        return open_storage(config)
    except StorageError as e:
        raise ConfigError(f"process server config: 'storage': {e}") from None


def object_key(item_id: uuid.UUID, seq: int) -> str:
    return f"logs/{item_id}/{seq:020d}{OBJECT_SUFFIX}"


def seal_context(item_id: uuid.UUID, seq: int) -> bytes:
    return f"{item_id}:{seq}".encode()


# --- per-item state ------------------------------------------------------------------------------


@dataclass
class _Item:
    id: uuid.UUID
    dir: str
    acked: int = 0  # highest seq durably cached or uploaded
    uploaded: int = 0  # highest seq put into storage and recorded so (the marker)
    put: int = 0  # highest seq put into storage (puts of an item are made in seq order)
    pending: dict[int, int] = field(default_factory=dict)  # seq -> size, cached, not yet uploaded
    claimed: set[int] = field(default_factory=set)  # seqs an uploader is putting
    receiving: dict[int, int] = field(default_factory=dict)  # seq -> requests receiving it
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


class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str, *, close: bool = False, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close, self.extra = status, code, message, close, extra


class ProcessServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cache_dir = config.cache_dir
        self.items_dir = os.path.join(self.cache_dir, "items")
        self.tmp_dir = os.path.join(self.cache_dir, "tmp")
        self.lock = threading.Condition()
        self.items: dict[uuid.UUID, _Item] = {}
        self.pending_bytes = 0
        self.reserved_bytes = 0  # bodies being received
        self.stopping = threading.Event()
        self.storage = open_target_storage(config.storage)
        self.ingest_slots = threading.BoundedSemaphore(config.max_ingest)
        # bytes held by batches being received and sealed (see _take_memory)
        self.memory_budget = config.ingest_memory_bytes
        self.sealing_bytes = 0
        # bodies and sealed objects, reused from batch to batch (idle ones: half the budget)
        self.buffers = buffers.BufferPool(keep_bytes=config.ingest_memory_bytes // 2)
        self.started_at = time.time()
        self.cert_path = self.key_path = ""
        self.thumbprint = ""
        self.httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._upload_cursor = 0
        self.upload_errors = 0
        self.last_upload_error = ""
        self._proc = None
        self._digest_lock = threading.Lock()
        self._digests: dict[tuple[uuid.UUID, int], tuple[replica_digests.DigestObject, list[bytes]]] = {}

    def digests_for(self, item_id: uuid.UUID, disk: int,
                    min_seq: int) -> tuple[replica_digests.DigestObject, list[bytes]] | None:
        """The digest object of a replica disk computed at an applied seq of at least
        ``min_seq`` (with its group digests, made once), or None after asking the worker
        for it. Storage errors propagate."""
        key = (item_id, disk)
        with self._digest_lock:
            cached = self._digests.get(key)
        if cached is not None and cached[0].applied_seq >= min_seq:
            return cached
        try:
            obj = replica_digests.decode_object(self.storage.get_object(replica_digests.digest_key(item_id, disk)))
        except (ObjectNotFound, replica_digests.DigestError):
            obj = None
        if obj is None or obj.applied_seq < min_seq:
            replica_digests.digest_request_write(self.storage, item_id, min_seq)
            return None
        entry = (obj, [])
        with self._digest_lock:
            self._digests.pop(key, None)
            self._digests[key] = entry
            while len(self._digests) > DIGEST_CACHE_ENTRIES:
                self._digests.pop(next(iter(self._digests)))
        return entry

    # -- life cycle

    @property
    def port(self) -> int:
        assert self.httpd is not None, "server not started"
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"https://{self.config.host}:{self.port}"

    def start(self) -> "ProcessServer":
        os.makedirs(self.items_dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)
        self.cert_path, self.key_path, self.thumbprint = ensure_certificate(
            os.path.join(self.cache_dir, "tls"), host=self.config.host
        )
        self._recover()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        self.httpd = _HTTPServer((self.config.host, self.config.port), _Handler, self, ctx)
        for n in range(self.config.upload_workers):
            self._spawn(self._upload_loop, f"uploader-{n}")
        self._spawn(self.httpd.serve_forever, "https")
        if self.config.report_url:
            self._spawn(self._report_loop, "reporter")
        write_durably(
            os.path.join(self.cache_dir, "server.json"),
            json.dumps(
                {"pid": os.getpid(), "host": self.config.host, "port": self.port,
                 "thumbprint": self.thumbprint, "version": VERSION}
            ).encode(),
        )
        log.info("process server listening on %s (thumbprint %s)", self.url, self.thumbprint)
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        with self.lock:
            self.lock.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=f"ps-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def _recover(self) -> None:
        """Rebuild the per-item state from the cache directory after a start or a crash."""
        for name in os.listdir(self.tmp_dir):
            os.unlink(os.path.join(self.tmp_dir, name))
        for name in os.listdir(self.items_dir):
            try:
                item_id = uuid.UUID(name)
            except ValueError:
                continue
            item = _Item(item_id, os.path.join(self.items_dir, name), dir_made=True)
            item.marker = SeqMarker(os.path.join(item.dir, "uploaded"))
            item.uploaded = item.put = item.marker.seq
            for entry in os.listdir(item.dir):
                path = os.path.join(item.dir, entry)
                if entry.endswith(".tmp"):
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
            self.items[item_id] = item
            self.pending_bytes += sum(item.pending.values())

    def _item(self, item_id: uuid.UUID) -> _Item:
        """The item's state, its place in the stream checked against storage (a new item
        continues after what storage holds). ``_Reject`` 503 when storage cannot say."""
        with self.lock:
            item = self.items.get(item_id)
            if item is None:
                item = _Item(item_id, os.path.join(self.items_dir, str(item_id)))
                self.items[item_id] = item
        if not item.floor_checked:
            try:
                self._sync_floor(item)
            except Exception as e:  # storage unreachable: say so, never guess a floor of 0
                log.warning("item %s: cannot read its stream position from storage: %s", item_id, e)
                raise _Reject(503, "storage_unavailable",
                              f"cache storage cannot say where item {item_id}'s stream stands ({e}); retry later",
                              retry_after=2) from None
        return item

    def _sync_floor(self, item: _Item, *, recheck: bool = False) -> None:
        """Line the item up with the stream position storage holds (``apply.stream_floor``).

        Storage ahead of what this server put means this server's view of the item is stale
        (it was restored, or the item was served by another process server meanwhile):
        cached batches at or below the floor are dropped (they are there already, or they
        are stale) and the item continues after the floor. Sequence numbers therefore never
        go back behind what apply has seen. ``recheck`` runs it again for a known item (an
        agent ahead of this server, or asking where its stream stands)."""
        with item.floor_lock:
            if item.floor_checked and not recheck:
                return
            floor = stream_floor(self.storage, item.id)
            with item.commit_lock, self.lock:
                if floor > item.put and not item.claimed:
                    stale = sorted(s for s in item.pending if s <= floor)
                    for seq in stale:
                        _unlink_quietly(item.cached_path(seq))
                        self.pending_bytes -= item.pending.pop(seq)
                    if item.floor_checked or item.acked:
                        log.warning("item %s: storage holds its stream through seq %d, this server only %d: "
                                    "continuing after %d (%d stale cached batch(es) dropped)",
                                    item.id, floor, item.put, floor, len(stale))
                    item.put = item.uploaded = floor
                    item.acked = max(floor, max(item.pending, default=floor))
                    if item.marker is not None:
                        item.marker.write(floor)
                item.floor_checked = True
                self.lock.notify_all()

    # -- ingest

    def _throttle(self, length: int) -> None:
        """Hold a batch until the ingest budget (max_ingest_bytes_per_s) has room for it."""
        rate = self.config.max_ingest_bytes_per_s
        if rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, getattr(self, "_ingest_free_at", now))
            self._ingest_free_at = start + length / rate
        if start > now:
            time.sleep(start - now)

    def receive_batch(self, handler: "_Handler", item_id: uuid.UUID, length: int,
                      seq_hint: int | None = None) -> int:
        """Stream, validate and durably cache one batch; returns the acked seq or raises _Reject."""
        cfg = self.config
        self._throttle(length)
        if not os.path.isdir(self.tmp_dir):
            # The cache directory vanished under the running server: make it again. The
            # items' folders went with it; each is owned up to when next used (_cache_lost),
            # so nothing acknowledged is claimed any more.
            log.error("the cache directory %s is gone; making it again", self.cache_dir)
            os.makedirs(self.tmp_dir, exist_ok=True)
            os.makedirs(self.items_dir, exist_ok=True)
        with self.lock:
            full = self.pending_bytes + self.reserved_bytes + length > cfg.max_cache_bytes
        if full or shutil.disk_usage(self.cache_dir).free < length + DISK_FREE_MARGIN:
            handler.drain(length)
            raise _Reject(503, "cache_full", "the process server cache is full; retry later", retry_after=2)
        with self.lock:
            self.reserved_bytes += length
        handler.body_read = True  # from here on the body is read (or drained) by this method
        item = None
        announced: list[int] = []  # seqs this request counts in item.receiving
        tmp = ""
        committed = False
        try:
            try:
                item = self._item(item_id)
            except _Reject:
                handler.drain(length)
                raise
            if seq_hint is not None:
                self._announce(item, seq_hint, announced)
            with self.ingest_slots:
                seq, tmp, size = self._receive_into_cache(handler, item, length, announced)
            # Memory and the ingest slot are free again: a batch that waits here for its
            # predecessor holds nothing the predecessor needs.
            acked = self._commit(item, seq, tmp, size)
            committed = True
            return acked
        finally:
            if tmp and not committed:
                _unlink_quietly(tmp)
            with self.lock:
                for s in announced:
                    item.receiving[s] -= 1
                    if not item.receiving[s]:
                        del item.receiving[s]
                self.reserved_bytes -= length
                self.lock.notify_all()

    def _announce(self, item: _Item, seq: int, announced: list[int]) -> bool:
        """Count ``seq`` as arriving for the item (unless already acknowledged): a later
        batch of the item waits for it instead of being refused as a gap."""
        with self.lock:
            if seq <= item.acked:
                return False
            item.receiving[seq] = item.receiving.get(seq, 0) + 1
            announced.append(seq)
            self.lock.notify_all()
            return True

    def _receive_into_cache(self, handler: "_Handler", item: _Item, length: int,
                            announced: list[int]) -> tuple[int, str, int]:
        """Read the body into memory while validating it, seal it in one piece (one-shot
        zstd is markedly cheaper than streaming) and write the sealed object, durably, to a
        temp file of the cache: the cache holds each batch as the object it will be in
        storage, so nothing is read back or written again to upload it. Returns (seq, temp
        path, size). The bytes held at once are capped (below)."""
        need = SEAL_MEMORY_FACTOR * length
        self._take_memory(need, handler, length)
        try:
            return self._receive_sealed(handler, item, length, announced)
        finally:
            with self.lock:
                self.sealing_bytes -= need
                self.lock.notify_all()

    def _take_memory(self, need: int, handler: "_Handler", length: int) -> None:
        """Wait until ``need`` bytes fit in the sealing memory budget (always, when nothing
        else holds any): memory stays bounded however many agents send at once."""
        deadline = time.monotonic() + self.config.io_timeout
        with self.lock:
            while self.sealing_bytes and self.sealing_bytes + need > self.memory_budget:
                if self.stopping.is_set() or time.monotonic() > deadline:
                    handler.drain(length)
                    raise _Reject(503, "busy", "the process server is busy; retry later", retry_after=1)
                self.lock.wait(timeout=0.5)
            self.sealing_bytes += need

    def _receive_sealed(self, handler: "_Handler", item: _Item, length: int,
                        announced: list[int]) -> tuple[int, str, int]:
        validator = batch_format.StreamValidator()
        body = self.buffers.take(length)
        sealed_buf = None
        view = memoryview(body)
        seen_header = False
        tmp = ""
        try:
            pos = 0
            while pos < length:
                n = handler.rfile.readinto(view[pos : min(length, pos + CHUNK_BYTES)])
                if not n:
                    raise _Reject(400, "truncated_body",
                                  f"the body ended {length - pos} bytes before its Content-Length", close=True)
                try:
                    validator.feed(view[pos : pos + n])
                except batch_format.MalformedBatch as e:
                    handler.drain(length - pos - n)
                    raise _Reject(400, "malformed_batch", str(e)) from None
                pos += n
                if not seen_header and validator.header is not None:
                    seen_header = True
                    batch_item, batch_seq = validator.header[0], validator.header[1]
                    if batch_item != item.id:
                        handler.drain(length - pos)
                        raise _Reject(400, "item_mismatch",
                                      f"the batch belongs to item {batch_item}, not to {item.id}")
                    if batch_seq not in announced and not self._announce(item, batch_seq, announced):
                        handler.drain(length - pos)
                        raise _Reject(409, "replayed_batch", f"batch {batch_seq} is already acknowledged",
                                      acked_seq=item.acked)
            try:
                info = validator.finish()
            except batch_format.MalformedBatch as e:
                raise _Reject(400, "malformed_batch", str(e)) from None

            def sealed_buffer(size: int) -> memoryview:
                nonlocal sealed_buf
                sealed_buf = self.buffers.take(size)
                return memoryview(sealed_buf)

            with sealing.seal_into(view[:length], key=self.config.seal_key, context=seal_context(item.id, info.seq),
                                   level=self.config.seal_level, buffer=sealed_buffer) as sealed:
                size = len(sealed)
            view.release()
            self.buffers.give(body)
            body = None
            tmp = os.path.join(self.tmp_dir, f"{secrets.token_hex(8)}.part")
            buffers.write_new_file(tmp, sealed_buf, size)
            return info.seq, tmp, size
        except BaseException:
            if tmp:
                _unlink_quietly(tmp)
            raise
        finally:
            view.release()
            for buf in (body, sealed_buf):
                if buf is not None:
                    self.buffers.give(buf)

    def _commit(self, item: _Item, seq: int, tmp: str, size: int) -> int:
        # A predecessor still arriving on another connection is waited for, not refused;
        # one not seen yet is given GAP_GRACE_SECONDS to show up (an agent sends a few
        # batches at once, and their requests may reach this server in any order).
        start = time.monotonic()
        with self.lock:
            while seq > item.acked + 1 and not self.stopping.is_set():
                waited = time.monotonic() - start
                arriving = any(item.acked < s < seq for s in item.receiving)
                if waited >= self.config.io_timeout or (not arriving and waited >= GAP_GRACE_SECONDS):
                    break
                self.lock.wait(timeout=0.5 if arriving else 0.05)
        if seq > item.acked + 1:
            # The agent is ahead of this server: maybe storage is too (the item was served
            # elsewhere meanwhile). Look before answering with a gap the agent would take
            # for lost data.
            try:
                self._sync_floor(item, recheck=True)
            except Exception as e:
                log.warning("item %s: cannot recheck its stream position: %s", item.id, e)
        with item.commit_lock:  # one commit of an item at a time keeps its acks in order
            acked = item.acked
            if seq <= acked:
                raise _Reject(409, "replayed_batch", f"batch {seq} is already acknowledged", acked_seq=acked)
            if seq > acked + 1:
                raise _Reject(409, "sequence_gap",
                              f"batch {seq} does not follow the last acknowledged batch {acked}", acked_seq=acked)
            if not item.dir_made:
                os.makedirs(item.dir, exist_ok=True)
                fsync_dir(self.items_dir)
                item.marker = SeqMarker(os.path.join(item.dir, "uploaded"))
                if item.uploaded:
                    item.marker.write(item.uploaded)  # where this server took the item up
                item.dir_made = True
            try:
                os.rename(tmp, item.cached_path(seq))
            except FileNotFoundError:
                if os.path.isdir(item.dir):
                    raise
                self._cache_lost(item, f"its cache folder {item.dir} is gone")
                raise _Reject(503, "cache_lost", "the process server lost this item's cache; retry", retry_after=1,
                              acked_seq=item.acked) from None
            fsync_dir(item.dir)
            with self.lock:
                item.acked = seq
                item.pending[seq] = size
                self.pending_bytes += size
                self.lock.notify_all()
            return seq

    # -- upload

    def _claim(self) -> tuple[_Item, int] | None:
        items = [i for i in self.items.values() if i.floor_checked]
        for i in range(len(items)):
            item = items[(self._upload_cursor + i) % len(items)]
            for seq in sorted(item.pending):
                if seq not in item.claimed:
                    item.claimed.add(seq)
                    self._upload_cursor = (self._upload_cursor + i + 1) % max(len(items), 1)
                    return item, seq
        return None

    def _upload_loop(self) -> None:
        _name_os_thread(threading.current_thread().name)
        while not self.stopping.is_set():
            for item in [i for i in list(self.items.values()) if not i.floor_checked]:
                try:  # items found in the cache at start: line them up with storage first
                    self._sync_floor(item)
                except Exception as e:
                    log.warning("item %s: cannot read its stream position from storage yet: %s", item.id, e)
                    self.stopping.wait(1.0)
            with self.lock:
                work = self._claim()
                if work is None:
                    self.lock.wait(timeout=1.0)
                    continue
            item, seq = work
            try:
                self._upload_one(item, seq)
            except Exception:  # an uploader must not die: the batch stays claimed and cached
                log.exception("uploader failed on item %s batch %d", item.id, seq)
                self.stopping.wait(1.0)

    def _upload_one(self, item: _Item, seq: int) -> None:
        """Put one cached (already sealed) batch into storage; retries (with backoff) until
        it is there, because the batches after it wait for it: objects of an item appear in
        storage in seq order."""
        path = item.cached_path(seq)
        key = object_key(item.id, seq)
        attempt = 0
        while not self.stopping.is_set():
            if item.lost:
                return
            if not os.path.exists(path):
                self._cache_lost(item, f"acknowledged batch {seq} is missing from {item.dir}")
                return
            try:
                with self.lock:  # the previous batch of the item goes first
                    while item.put < seq - 1 and not self.stopping.is_set():
                        self.lock.wait(timeout=0.5)
                if self.stopping.is_set():
                    return
                self.storage.put_object_file(key, path)
                with self.lock:
                    item.put = max(item.put, seq)
                    self.lock.notify_all()
                break
            except Exception as e:  # storage or disk trouble: keep the batch and retry
                attempt += 1
                self.upload_errors += 1
                self.last_upload_error = f"{type(e).__name__}: {e}"
                delay = min(30.0, 0.2 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
                log.warning("upload of item %s batch %d failed (attempt %d), retrying in %.1fs: %s",
                            item.id, seq, attempt, delay, self.last_upload_error)
                self.stopping.wait(delay)
        else:
            return
        attempt = 0
        while not self.stopping.is_set() and not item.lost:
            try:
                self._record_uploaded(item)
                return
            except OSError as e:  # the cache disk: try again (the batch is safe in storage)
                attempt += 1
                log.warning("recording item %s as uploaded through %d failed: %s", item.id, seq, e)
                self.stopping.wait(min(30.0, 0.2 * 2 ** min(attempt, 10)))

    def _record_uploaded(self, item: _Item) -> None:
        """Durably note how far the item's batches are in storage, then drop their cache
        files. Off the path of the next put: that one only needed this put done."""
        with item.marker_lock:
            with self.lock:
                through = item.put
            if through <= item.uploaded:
                return
            item.marker.write(through)
            done = [s for s in list(item.pending) if s <= through]
            for seq in done:
                _unlink_quietly(item.cached_path(seq))
            with self.lock:
                item.uploaded = through
                for seq in done:
                    item.claimed.discard(seq)
                    size = item.pending.pop(seq, None)
                    if size is not None:
                        self.pending_bytes -= size
                self.lock.notify_all()

    def _cache_lost(self, item: _Item, why: str) -> None:
        """The item's cached (acknowledged, not yet uploaded) batches vanished under the
        running server. Forget the item: its next request lines it up with storage again
        (``_item``), the agent then finds the server behind what it acknowledged and
        resynchronizes the item. Nothing is uploaded for it from the old state."""
        with self.lock:
            if item.lost:
                return
            item.lost = True
            if self.items.get(item.id) is item:
                del self.items[item.id]
            lost = sorted(item.pending)
            self.pending_bytes -= sum(item.pending.values())
            item.pending.clear()
            item.claimed.clear()
            self.lock.notify_all()
        if lost:
            log.error("item %s: the process server lost acknowledged data (%s): batches %d-%d never reached "
                      "storage; the item's stream goes on after what storage holds and the agent will "
                      "resynchronize it", item.id, why, lost[0], lost[-1])
        else:
            log.warning("item %s: %s, but no acknowledged batch was waiting in it; the item goes on after "
                        "what storage holds", item.id, why)

    # -- status

    def status(self) -> dict:
        import psutil

        if self._proc is None:
            self._proc = psutil.Process()
        proc = self._proc
        mem = proc.memory_info()
        with self.lock:
            items = {
                str(i.id): {"acked_seq": i.acked, "uploaded_seq": i.uploaded, "pending_batches": len(i.pending)}
                for i in self.items.values() if i.floor_checked
            }
            pending_bytes = self.pending_bytes
            pending_count = sum(len(i.pending) for i in self.items.values())
            reserved = self.reserved_bytes
        disk_free = shutil.disk_usage(self.cache_dir).free
        return {
            "version": VERSION,
            "status": "ok",
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "cache_free_bytes": max(0, min(disk_free - DISK_FREE_MARGIN,
                                           self.config.max_cache_bytes - pending_bytes - reserved)),
            "pending_upload_bytes": pending_bytes,
            "pending_upload_count": pending_count,
            "cpu_percent": psutil.cpu_percent(interval=None),
            "process_cpu_percent": proc.cpu_percent(interval=None),
            "cache_total_bytes": min(self.config.max_cache_bytes, shutil.disk_usage(self.cache_dir).total),
            "memory_rss_bytes": mem.rss,
            "memory_percent": psutil.virtual_memory().percent,
            "memory_available_bytes": psutil.virtual_memory().available,
            "upload_errors": self.upload_errors,
            "last_upload_error": self.last_upload_error,
            "items": items,
        }

    def _report_loop(self) -> None:
        first = True  # report at once on start: the vault learns the certificate to pin
        while first or not self.stopping.wait(self.config.report_interval):
            first = False
            try:
                body = json.dumps({"thumbprint": self.thumbprint, "url": self.url, **self.status()}).encode()
                req = urllib.request.Request(self.config.report_url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                if self.config.report_token:
                    req.add_header("Authorization", f"Bearer {self.config.report_token}")
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
            except Exception as e:
                log.warning("heartbeat to %s failed: %s", self.config.report_url, e)


def _name_os_thread(name: str) -> None:
    """Give the OS thread a name (shown by top -H, ps -L) so an operator can see which part
    of the process server uses the CPU."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


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
                write_durably(self.path, bytes(2 * self.SLOT), mode=0o600)
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


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- HTTP ------------------------------------------------------------------------------------


class _HTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, ps: ProcessServer, ctx: ssl.SSLContext) -> None:
        self.ps = ps
        self.ssl_context = ctx
        self.connection_slots = threading.BoundedSemaphore(ps.config.max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.connection_slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connection_slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()

    def finish_request(self, request, client_address):
        # The TLS handshake runs in the connection's own thread, so a slow client cannot
        # hold up accepting others.
        _name_os_thread("ps-connection")
        request.settimeout(self.ps.config.io_timeout)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.debug("TLS handshake with %s failed: %s", client_address, e)
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # an ack must not wait for the client's delayed ACK
    server_version = f"Lifeboat-ProcessServer/{VERSION}"
    sys_version = ""
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    def do_GET(self) -> None:
        ps = self.server.ps
        if self.path == "/v1/health":
            self._json(200, {"status": "ok", "version": VERSION, "service": "lifeboat-process-server"})
        elif self.path == "/v1/status":
            if not verify_token(ps.config.auth_key, self._bearer() or "", STATUS_SUBJECT):
                self._error(_Reject(401, "unauthenticated", "a valid process-server token is required"))
                return
            self._json(200, ps.status())
        elif self.path.startswith("/v1/items/") and "/digests/" in self.path:
            self._get_digests()
        elif self.path.startswith("/v1/items/"):
            try:
                item_id = uuid.UUID(self.path[len("/v1/items/"):].strip("/"))
            except ValueError:
                self._error(_Reject(404, "not_found", f"no such resource: {self.path}"))
                return
            if not verify_token(ps.config.auth_key, self._bearer() or "", item_subject(item_id)):
                log.warning("refused the state of item %s to %s: the token is not valid for this item",
                            item_id, self.client_address[0])
                self._error(_Reject(403, "forbidden", f"the token is not valid for item {item_id}"))
                return
            try:
                item = ps._item(item_id)
                ps._sync_floor(item, recheck=True)  # the agent asks where to go on from: be sure
            except _Reject as r:
                self._error(r)
                return
            except Exception as e:
                self._error(_Reject(503, "storage_unavailable", f"cache storage cannot say where the stream stands ({e})",
                                    retry_after=2))
                return
            with ps.lock:
                state = {"item_id": str(item_id), "acked_seq": item.acked, "uploaded_seq": item.uploaded,
                         "receiving_batches": sum(item.receiving.values())}
            self._json(200, state)
        else:
            self._error(_Reject(404, "not_found", f"no such resource: {self.path}"))

    def _get_digests(self) -> None:
        """``GET /v1/items/<id>/digests/<disk>[/blocks]?min_seq=N[&groups=...]``."""
        ps = self.server.ps
        path, _, query = self.path.partition("?")
        parts = path.strip("/").split("/")
        if not (len(parts) == 5 or (len(parts) == 6 and parts[5] == "blocks")) or parts[3] != "digests":
            self._error(_Reject(404, "not_found", f"no such resource: {path}"))
            return
        try:
            item_id = uuid.UUID(parts[2])
        except ValueError:
            self._error(_Reject(404, "not_found", f"{parts[2]!r} is not an item id"))
            return
        if not verify_token(ps.config.auth_key, self._bearer() or "", item_subject(item_id)):
            log.warning("refused digests of item %s to %s: the token is not valid for this item",
                        item_id, self.client_address[0])
            self._error(_Reject(403, "forbidden", f"the token is not valid for item {item_id}"))
            return
        blocks = len(parts) == 6
        try:
            params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
            names = [k for k, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)]
        except ValueError:
            self._error(_Reject(400, "bad_request", f"the query {query!r} is malformed"))
            return
        allowed = {"min_seq", "groups"} if blocks else {"min_seq"}
        disk_text, seq_text = parts[4], params.get("min_seq", "")
        problem = ""
        if len(names) != len(set(names)) or set(names) - allowed:
            problem = f"the parameters must be {' and '.join(sorted(allowed))}, each once"
        elif not (disk_text.isdigit() and len(disk_text) <= 3 and int(disk_text) < batch_format.MAX_DISKS):
            problem = f"disk {disk_text!r} is not a disk index 0..{batch_format.MAX_DISKS - 1}"
        elif not (seq_text.isdigit() and len(seq_text) <= 19 and int(seq_text) < 2**63):
            problem = f"min_seq {seq_text!r} is not a sequence number"
        elif blocks and not params.get("groups"):
            problem = "groups (like 0-3,7) is required"
        if problem:
            self._error(_Reject(400, "bad_request", problem))
            return
        disk, min_seq = int(disk_text), int(seq_text)
        if blocks:  # the syntax is checked before anything is read or written
            try:
                replica_digests.parse_groups(params["groups"], group_count=2**62)
            except replica_digests.DigestError as e:
                self._error(_Reject(400, "bad_request", str(e)))
                return
        try:
            found = ps.digests_for(item_id, disk, min_seq)
        except Exception as e:
            self._error(_Reject(503, "storage_unavailable", f"cache storage cannot give the replica's digests ({e})",
                                retry_after=2))
            return
        if found is None:
            self._json(202, {"status": "computing", "min_seq": min_seq,
                             "message": "the replica's digests are being computed; ask again"},
                       {"Retry-After": str(DIGEST_RETRY_SECONDS)})
            return
        obj, groups_cache = found
        if blocks:
            try:
                wanted = replica_digests.parse_groups(params["groups"], group_count=obj.group_count)
            except replica_digests.DigestError as e:
                self._error(_Reject(400, "bad_request", str(e)))
                return
            body = replica_digests.blocks_of_groups(obj, wanted)
        else:
            if not groups_cache:
                groups_cache.append(obj.groups())
            body = groups_cache[0]
        self._binary(200, body, {
            "X-Lifeboat-Applied-Seq": str(obj.applied_seq), "X-Lifeboat-Disk-Size": str(obj.disk_size),
            "X-Lifeboat-Block-Bytes": str(replica_digests.FINE_BYTES),
            "X-Lifeboat-Group-Blocks": str(replica_digests.GROUP_BLOCKS)})

    def _binary(self, status: int, data: bytes, headers: dict) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True

    def do_POST(self) -> None:
        self.body_read = False
        try:
            item_id = self._batch_item()
            acked = self._post_batch(item_id)
        except _Reject as r:
            self._error(r)
            return
        except (TimeoutError, ConnectionError, ssl.SSLError) as e:
            log.info("batch upload from %s aborted: %s", self.client_address[0], e)
            self.close_connection = True
            return
        except Exception as e:  # a fault of this server: say so, to the log and the agent
            log.exception("batch from %s failed", self.client_address[0])
            self._error(_Reject(500, "internal_error", f"the process server failed: {type(e).__name__}: {e}",
                                close=True))
            return
        self._json(200, {"acked_seq": acked})

    def do_PUT(self) -> None:
        self.body_read = False
        self._error(_Reject(405, "method_not_allowed", "use POST to send a batch", close=True))

    do_DELETE = do_PATCH = do_PUT

    def _batch_item(self) -> uuid.UUID:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) != 4 or parts[0] != "v1" or parts[1] != "items" or parts[3] != "batches":
            raise _Reject(404, "not_found", f"no such resource: {self.path}", close=True)
        try:
            return uuid.UUID(parts[2])
        except ValueError:
            raise _Reject(404, "not_found", f"{parts[2]!r} is not an item id", close=True) from None

    def _post_batch(self, item_id: uuid.UUID) -> int:
        ps = self.server.ps
        if self.headers.get("Transfer-Encoding"):
            raise _Reject(411, "length_required", "send the batch with a Content-Length, not chunked", close=True)
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise _Reject(411, "length_required", "a Content-Length header is required", close=True)
        if not raw_length.isdigit():
            raise _Reject(400, "bad_request", f"Content-Length {raw_length!r} is not a number", close=True)
        length = int(raw_length)
        if length > batch_format.MAX_BATCH_BYTES:  # refused before a byte of the body is read
            raise _Reject(413, "batch_too_large",
                          f"a batch of {length} bytes is over the {batch_format.MAX_BATCH_BYTES}-byte limit",
                          close=True)
        token = self._bearer()
        if token is None:
            raise _Reject(401, "unauthenticated", "an 'Authorization: Bearer <item token>' header is required",
                          close=True)
        if not verify_token(ps.config.auth_key, token, item_subject(item_id)):
            log.warning("refused a batch for item %s from %s: the token is not valid for this item",
                        item_id, self.client_address[0])
            raise _Reject(403, "forbidden", f"the token is not valid for item {item_id}", close=True)
        hint = self.headers.get("X-Lifeboat-Seq", "")  # announces the batch before its body is read
        return ps.receive_batch(self, item_id, length, int(hint) if hint.isdigit() and 0 < int(hint) < 2**63 else None)

    def drain(self, left: int) -> None:
        """Read and drop the rest of a refused body so the client can read the answer."""
        self.body_read = True
        buf = bytearray(min(CHUNK_BYTES, max(left, 1)))
        view = memoryview(buf)
        while left:
            n = self.rfile.readinto(view[: min(len(buf), left)])
            if not n:
                self.close_connection = True
                return
            left -= n

    def _bearer(self) -> str | None:
        value = self.headers.get("Authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    def _error(self, r: _Reject) -> None:
        if not getattr(self, "body_read", True):
            # A body left unread makes closing the socket reset the connection, and the
            # client would lose this answer: read (at most a batch's worth of) it first.
            length = self.headers.get("Content-Length", "")
            if length.isdigit() and int(length) <= batch_format.MAX_BATCH_BYTES and not self.headers.get(
                    "Transfer-Encoding"):
                try:
                    self.drain(int(length))
                except (OSError, ssl.SSLError):
                    self.close_connection = True
                    return
        body = {"error": {"code": r.code, "message": r.message}}
        if "acked_seq" in r.extra:
            body["acked_seq"] = r.extra["acked_seq"]
        headers = {}
        if "retry_after" in r.extra:
            headers["Retry-After"] = str(r.extra["retry_after"])
        if r.close:
            self.close_connection = True
        self._json(r.status, body, headers)

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True


# --- entry point ------------------------------------------------------------------------------


class ProcessServerProcess:
    """A process server running as its own process (``spawn``); for workers, tests and the
    benchmark. ``url``/``thumbprint``/``port`` are known once it answers."""

    def __init__(self, config_path: str, cache_dir: str, popen) -> None:
        self.config_path = config_path
        self.cache_dir = cache_dir
        self.popen = popen
        self.port = 0
        self.host = "127.0.0.1"
        self.thumbprint = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> "ProcessServerProcess":
        deadline = time.monotonic() + timeout
        info_path = os.path.join(self.cache_dir, "server.json")
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"process server exited with code {self.popen.returncode} while starting")
            try:
                with open(info_path) as f:
                    info = json.load(f)
            except (FileNotFoundError, ValueError):
                info = {}
            if info.get("pid") == self.popen.pid:
                self.port, self.host, self.thumbprint = info["port"], info["host"], info["thumbprint"]
                return self
            time.sleep(0.02)
        raise TimeoutError(f"process server did not start within {timeout:.0f}s")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a crash."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except Exception:
                self.kill()


def spawn(config: dict, *, config_path: str, log_path: str | None = None, ready_timeout: float = 30.0,
          env: dict | None = None) -> ProcessServerProcess:
    """Write ``config`` to ``config_path`` and start ``python -m
    replication.dataplane.process_server`` on it; returns once it listens."""
    import subprocess

    cfg = ServerConfig.from_dict(config)  # refuse a bad config here, with its message
    write_durably(config_path, json.dumps(config).encode(), mode=0o600)
    _unlink_quietly(os.path.join(cfg.cache_dir, "server.json"))
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, child_env.get("PYTHONPATH")]))
    popen = subprocess.Popen([sys.executable, "-m", "replication.dataplane.process_server", "--config", config_path],
                             stdout=out, stderr=subprocess.STDOUT, env=child_env, cwd=root)
    if log_path:
        out.close()
    return ProcessServerProcess(config_path, cfg.cache_dir, popen).wait_ready(ready_timeout)


def load_config(path: str) -> ServerConfig:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read process server config {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"process server config {path} must hold a JSON object")
    return ServerConfig.from_dict(raw)


def serve(config: ServerConfig) -> None:
    """Run a process server in this process until SIGTERM or SIGINT."""
    tune_allocator()
    server = ProcessServer(config).start()
    print(f"lifeboat process server {VERSION} listening on {server.url}", flush=True)
    print(f"thumbprint: {server.thumbprint}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.dataplane.process_server",
                                     description="Lifeboat process server: HTTPS ingest of replication batches.")
    parser.add_argument("--config", required=True, help="JSON config file")
    parser.add_argument("--print-thumbprint", action="store_true",
                        help="make the certificate if needed, print its SHA-256 thumbprint and exit")
    parser.add_argument("--log-level", default=os.environ.get("LIFEBOAT_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_thumbprint:
        print(ensure_certificate(os.path.join(config.cache_dir, "tls"), host=config.host)[2])
        return 0
    try:
        serve(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot start the process server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
