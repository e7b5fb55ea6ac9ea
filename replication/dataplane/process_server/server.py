"""The process server's core: ingest of batches into the cache, upload into storage, status.

``receive_batch`` streams a batch's body while ``batch.StreamValidator`` checks it, seals it
(``sealing.seal_into``), writes the sealed object to a temp file of the cache and
acknowledges it once it is renamed into the item's directory and that directory fsync'd, in
seq order per item (``_commit``; a batch whose predecessor is still arriving waits for it).
Uploader threads put the cached batches into storage in seq order per item, record the
item's uploaded seq (``cache.SeqMarker``) and drop the cache files. ``_sync_floor`` lines an
item up with the stream position storage holds (``apply.stream_floor``).

Item tokens are checked here, offline (``item_token_refusal``): a token must be the vault's
for the item, at a generation no lower than the one the configuration server last named for
it. The configuration server names them in the answer to every heartbeat (an item whose
token was rotated); they are kept in ``token_generations.json`` in the cache directory, so
a restarted server refuses revoked tokens before its first heartbeat too.
"""
from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import ssl
import threading
import time
import urllib.request
import uuid

import psutil

from mobility.durable import fsync_dir, replace_durably, unlink_quietly
from replication.dataplane import batch as batch_format
from replication.dataplane import buffers
from replication.dataplane import digests as replica_digests
from replication.dataplane import sealing
from replication.dataplane.apply import stream_floor
from replication.dataplane.auth import REVOKED, VALID, check_token, item_subject
from replication.dataplane.process_server.cache import Item, SeqMarker, recover_items
from replication.dataplane.process_server.config import (
    CHUNK_BYTES,
    DIGEST_CACHE_ENTRIES,
    DISK_FREE_MARGIN,
    GAP_GRACE_SECONDS,
    SEAL_MEMORY_FACTOR,
    VERSION,
    ServerConfig,
    ensure_certificate,
    object_key,
    parse_token_generations,
    open_target_storage,
    seal_context,
)
from replication.dataplane.process_server.https import Handler, HTTPSServer, Reject, name_os_thread
from replication.dataplane.process_server.metrics import start_metrics
from replication.dataplane.storage import ObjectNotFound

log = logging.getLogger("lifeboat.process_server")

TOKEN_GENERATIONS_FILE = "token_generations.json"
WAKE_MOST = 1000  # item ids in one wake-up POST (what the vault accepts)


class ProcessServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cache_dir = config.cache_dir
        self.items_dir = os.path.join(self.cache_dir, "items")
        self.tmp_dir = os.path.join(self.cache_dir, "tmp")
        self.lock = threading.Condition()
        self.items: dict[uuid.UUID, Item] = {}
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
        self.httpd: HTTPSServer | None = None
        self._threads: list[threading.Thread] = []
        self._upload_cursor = 0
        self.upload_errors = 0
        self.last_upload_error = ""
        # Counters since the start (guarded by self.lock): the heartbeat's figures, from
        # which the vault computes rates, and the metrics endpoint's (metrics.py).
        self.received_bytes = self.received_batches = 0
        self.uploaded_bytes = self.uploaded_batches = 0
        self.refusals: dict[str, int] = {}  # error code -> requests refused with it
        self.metrics_httpd = None
        self._proc = None
        self._digest_lock = threading.Lock()
        self._digests: dict[tuple[uuid.UUID, int], tuple[replica_digests.DigestObject, list[bytes]]] = {}
        # The lowest item token generation still valid, per item (items not named: any).
        self.token_generations: dict[uuid.UUID, int] = dict(config.token_generations)
        # Items with logs put into storage since the vault was last told (_wake_loop).
        self.uploaded_news: set[uuid.UUID] = set()
        self.wakeups_sent = self.wakeup_errors = 0

    # -- item tokens

    def item_token_refusal(self, item_id: uuid.UUID, token: str | None, *, close: bool = False) -> Reject | None:
        """None if ``token`` may act for the item; else the answer: 401 ``token_revoked`` for
        a token of a generation revoked since (the agent fetches its assignment again and
        gets the current one), 403 ``forbidden`` for one that is not the item's at all
        (``close``: and end the connection)."""
        result = check_token(self.config.auth_key, token or "", item_subject(item_id),
                             min_generation=self.token_generations.get(item_id, 0))
        if result == VALID:
            return None
        if result == REVOKED:
            return Reject(401, "token_revoked", f"the token of item {item_id} was rotated: the configuration server's "
                                                "assignment holds the current one", close=close)
        return Reject(403, "forbidden", f"the token is not valid for item {item_id}", close=close)

    def token_generations_update(self, generations: dict[uuid.UUID, int]) -> None:
        """Enforce the generations the configuration server named (they replace the previous
        set: it names every item whose token was ever rotated), kept on disk first."""
        if generations == self.token_generations:
            return
        body = json.dumps({str(k): v for k, v in sorted(generations.items(), key=lambda kv: str(kv[0]))}).encode()
        replace_durably(os.path.join(self.cache_dir, TOKEN_GENERATIONS_FILE), body)
        self.token_generations = dict(generations)
        log.info("item token generations now enforced for %d item(s)", len(generations))

    def _load_token_generations(self) -> None:
        path = os.path.join(self.cache_dir, TOKEN_GENERATIONS_FILE)
        try:
            with open(path) as f:
                kept = parse_token_generations(json.load(f), where=path)
        except FileNotFoundError:
            return
        except ValueError as e:
            log.error("%s is unreadable (%s): enforcing the configuration's token generations until the next "
                      "heartbeat answer", path, e)
            return
        for item_id, generation in kept.items():
            self.token_generations[item_id] = max(generation, self.token_generations.get(item_id, 0))

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
        self._load_token_generations()
        self._recover()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        self.httpd = HTTPSServer((self.config.host, self.config.port), Handler, self, ctx)
        for n in range(self.config.upload_workers):
            self._spawn(self._upload_loop, f"uploader-{n}")
        self._spawn(self.httpd.serve_forever, "https")
        if self.config.report_url:
            self._spawn(self._report_loop, "reporter")
        if self.config.uploaded_url:
            self._spawn(self._wake_loop, "waker")
        self.metrics_httpd = start_metrics(self)
        replace_durably(
            os.path.join(self.cache_dir, "server.json"),
            json.dumps(
                {"pid": os.getpid(), "host": self.config.host, "port": self.port,
                 "thumbprint": self.thumbprint, "version": VERSION,
                 "metrics_port": self.metrics_httpd.server_address[1] if self.metrics_httpd else None}
            ).encode(),
        )
        log.info("process server listening on %s (thumbprint %s)", self.url, self.thumbprint)
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self.metrics_httpd is not None:
            self.metrics_httpd.shutdown()
            self.metrics_httpd.server_close()
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
        self.items = recover_items(self.items_dir, self.tmp_dir)
        self.pending_bytes = sum(sum(item.pending.values()) for item in self.items.values())

    def _item(self, item_id: uuid.UUID) -> Item:
        """The item's state, its place in the stream checked against storage (a new item
        continues after what storage holds). ``Reject`` 503 when storage cannot say."""
        with self.lock:
            item = self.items.get(item_id)
            if item is None:
                item = Item(item_id, os.path.join(self.items_dir, str(item_id)))
                self.items[item_id] = item
        if not item.floor_checked:
            try:
                self._sync_floor(item)
            except Exception as e:  # storage unreachable: say so, never guess a floor of 0
                log.warning("item %s: cannot read its stream position from storage: %s", item_id, e)
                raise Reject(503, "storage_unavailable",
                              f"cache storage cannot say where item {item_id}'s stream stands ({e}); retry later",
                              retry_after=2) from None
        return item

    def _sync_floor(self, item: Item, *, recheck: bool = False) -> None:
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
                        unlink_quietly(item.cached_path(seq))
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

    def receive_batch(self, handler: Handler, item_id: uuid.UUID, length: int,
                      seq_hint: int | None = None) -> int:
        """Stream, validate and durably cache one batch; returns the acked seq or raises Reject."""
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
            raise Reject(503, "cache_full", "the process server cache is full; retry later", retry_after=2)
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
            except Reject:
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
            with self.lock:
                item.received_bytes += length
                self.received_bytes += length
                self.received_batches += 1
            return acked
        finally:
            if tmp and not committed:
                unlink_quietly(tmp)
            with self.lock:
                for s in announced:
                    item.receiving[s] -= 1
                    if not item.receiving[s]:
                        del item.receiving[s]
                self.reserved_bytes -= length
                self.lock.notify_all()

    def _announce(self, item: Item, seq: int, announced: list[int]) -> bool:
        """Count ``seq`` as arriving for the item (unless already acknowledged): a later
        batch of the item waits for it instead of being refused as a gap."""
        with self.lock:
            if seq <= item.acked:
                return False
            item.receiving[seq] = item.receiving.get(seq, 0) + 1
            announced.append(seq)
            self.lock.notify_all()
            return True

    def _receive_into_cache(self, handler: Handler, item: Item, length: int,
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

    def _take_memory(self, need: int, handler: Handler, length: int) -> None:
        """Wait until ``need`` bytes fit in the sealing memory budget (always, when nothing
        else holds any): memory stays bounded however many agents send at once."""
        deadline = time.monotonic() + self.config.io_timeout
        with self.lock:
            while self.sealing_bytes and self.sealing_bytes + need > self.memory_budget:
                if self.stopping.is_set() or time.monotonic() > deadline:
                    handler.drain(length)
                    raise Reject(503, "busy", "the process server is busy; retry later", retry_after=1)
                self.lock.wait(timeout=0.5)
            self.sealing_bytes += need

    def _receive_sealed(self, handler: Handler, item: Item, length: int,
                        announced: list[int]) -> tuple[int, str, int]:
        validator = batch_format.StreamValidator()
        body = self.buffers.take(length)
        sealed_buf = None
        view = memoryview(body)
        seen_header = False
        tmp = ""
        try:
            pos = 0
            handler.reading_body(length)  # at min_body_bytes_per_s, or the connection is cut
            while pos < length:
                n = handler.rfile.readinto(view[pos : min(length, pos + CHUNK_BYTES)])
                if not n:
                    raise Reject(400, "truncated_body",
                                  f"the body ended {length - pos} bytes before its Content-Length", close=True)
                try:
                    validator.feed(view[pos : pos + n])
                except batch_format.MalformedBatch as e:
                    handler.drain(length - pos - n)
                    raise Reject(400, "malformed_batch", str(e)) from None
                pos += n
                if not seen_header and validator.header is not None:
                    seen_header = True
                    batch_item, batch_seq = validator.header[0], validator.header[1]
                    if batch_item != item.id:
                        handler.drain(length - pos)
                        raise Reject(400, "item_mismatch",
                                      f"the batch belongs to item {batch_item}, not to {item.id}")
                    if batch_seq not in announced and not self._announce(item, batch_seq, announced):
                        handler.drain(length - pos)
                        raise Reject(409, "replayed_batch", f"batch {batch_seq} is already acknowledged",
                                      acked_seq=item.acked)
            handler.working()
            try:
                info = validator.finish()
            except batch_format.MalformedBatch as e:
                raise Reject(400, "malformed_batch", str(e)) from None

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
                unlink_quietly(tmp)
            raise
        finally:
            view.release()
            for buf in (body, sealed_buf):
                if buf is not None:
                    self.buffers.give(buf)

    def _commit(self, item: Item, seq: int, tmp: str, size: int) -> int:
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
                raise Reject(409, "replayed_batch", f"batch {seq} is already acknowledged", acked_seq=acked)
            if seq > acked + 1:
                raise Reject(409, "sequence_gap",
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
                raise Reject(503, "cache_lost", "the process server lost this item's cache; retry", retry_after=1,
                              acked_seq=item.acked) from None
            fsync_dir(item.dir)
            with self.lock:
                item.acked = seq
                item.pending[seq] = size
                self.pending_bytes += size
                self.lock.notify_all()
            return seq

    # -- upload

    def _claim(self) -> tuple[Item, int] | None:
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
        name_os_thread(threading.current_thread().name)
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

    def _upload_one(self, item: Item, seq: int) -> None:
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
                    self.uploaded_news.add(item.id)
                    size = item.pending.get(seq, 0)
                    item.uploaded_bytes += size
                    self.uploaded_bytes += size
                    self.uploaded_batches += 1
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

    def _record_uploaded(self, item: Item) -> None:
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
                unlink_quietly(item.cached_path(seq))
            with self.lock:
                item.uploaded = through
                for seq in done:
                    item.claimed.discard(seq)
                    size = item.pending.pop(seq, None)
                    if size is not None:
                        self.pending_bytes -= size
                self.lock.notify_all()

    def _cache_lost(self, item: Item, why: str) -> None:
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

    def refused(self, code: str) -> None:
        """Count a request answered with an error (``https.Handler._error``)."""
        with self.lock:
            self.refusals[code] = self.refusals.get(code, 0) + 1

    def status(self) -> dict:
        if self._proc is None:
            self._proc = psutil.Process()
        proc = self._proc
        mem = proc.memory_info()
        with self.lock:
            items = {
                str(i.id): {"acked_seq": i.acked, "uploaded_seq": i.uploaded, "pending_batches": len(i.pending),
                            "pending_bytes": sum(i.pending.values()), "received_bytes": i.received_bytes,
                            "uploaded_bytes": i.uploaded_bytes}
                for i in self.items.values() if i.floor_checked
            }
            pending_bytes = self.pending_bytes
            counters = {"received_bytes": self.received_bytes, "received_batches": self.received_batches,
                        "uploaded_bytes": self.uploaded_bytes, "uploaded_batches": self.uploaded_batches,
                        "refused_requests": dict(self.refusals)}
            pending_count = sum(len(i.pending) for i in self.items.values())
            reserved = self.reserved_bytes
        disk_free = shutil.disk_usage(self.cache_dir).free
        guard = self.httpd.guard if self.httpd is not None else None
        return {
            "version": VERSION,
            "status": "ok",
            "uptime_seconds": round(time.time() - self.started_at, 1),
            # The counters below count from this moment (Unix time): a new value means they
            # began again from 0.
            "started_at": self.started_at,
            **counters,
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
            # POSTs telling the vault of new logs (_wake_loop), and those that failed.
            "wakeups_sent": self.wakeups_sent,
            "wakeup_errors": self.wakeup_errors,
            "last_upload_error": self.last_upload_error,
            # Slow or idle clients cut (https.ConnectionGuard), and connections refused
            # because their address held its share, since the server started.
            "connections_open": guard.open_connections() if guard else 0,
            "slow_connections_cut": guard.cut if guard else 0,
            "connections_refused": guard.refused if guard else 0,
            "items": items,
        }

    def _wake_loop(self) -> None:
        """Tell the vault which items have new logs in storage, so that each gets an apply
        pass at once instead of at the next sweep: one POST to ``uploaded_url`` for all the
        items news gathered for, then ``wake_interval`` to gather more. A failed POST is
        not retried (the vault's sweep applies those logs anyway), and is logged once, then
        once a minute while it goes on failing."""
        name_os_thread(threading.current_thread().name)
        failing_since = 0.0
        last_warning = 0.0
        while not self.stopping.is_set():
            with self.lock:
                while not self.uploaded_news and not self.stopping.is_set():
                    self.lock.wait(timeout=5.0)
                news, self.uploaded_news = sorted(str(i) for i in self.uploaded_news), set()
            for at in range(0, len(news), WAKE_MOST):
                try:
                    self._post_to_vault(self.config.uploaded_url, {"items": news[at:at + WAKE_MOST]})
                    self.wakeups_sent += 1
                    if failing_since:
                        log.info("the vault takes apply wake-ups again (%s)", self.config.uploaded_url)
                    failing_since = 0.0
                except Exception as e:
                    self.wakeup_errors += 1
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if now - last_warning >= 60:
                        last_warning = now
                        log.warning("telling the vault of new logs at %s failed (its apply sweep applies them "
                                    "anyway): %s", self.config.uploaded_url, e)
            self.stopping.wait(self.config.wake_interval)

    def _post_to_vault(self, url: str, payload: dict, *, timeout: float = 10) -> dict:
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        if self.config.report_token:
            req.add_header("Authorization", f"Bearer {self.config.report_token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        answer = json.loads(raw) if raw else {}
        return answer if isinstance(answer, dict) else {}

    def _report_loop(self) -> None:
        first = True  # report at once on start: the vault learns the certificate to pin
        while first or not self.stopping.wait(self.config.report_interval):
            first = False
            try:
                answer = self._post_to_vault(self.config.report_url,
                                             {"thumbprint": self.thumbprint, "url": self.url, **self.status()})
                if "token_generations" in answer:
                    self.token_generations_update(parse_token_generations(
                        answer["token_generations"], where="the configuration server's heartbeat answer"))
            except Exception as e:
                log.warning("heartbeat to %s failed: %s", self.config.report_url, e)

