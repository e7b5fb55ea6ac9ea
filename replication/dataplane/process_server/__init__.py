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
An item token of a generation the configuration server revoked is refused with 401
``token_revoked`` (``ProcessServer.item_token_refusal``; it learns the generations from its
heartbeat's answer), any other wrong token with 403.
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

Run it with ``python -m replication.dataplane.process_server --config FILE`` or, in
process, ``ProcessServer(ServerConfig.from_dict(cfg)).start()``.

The package's modules: ``config`` (configuration, certificate, the names of stored batches),
``cache`` (per-item state, the uploaded-seq marker, recovery of the cache directory and its
layout), ``server`` (``ProcessServer``: ingest, upload, status), ``https`` (connections and
requests) and ``process`` (``serve``, ``main``, ``spawn``). What other code uses is imported
here.
"""
from replication.dataplane.process_server.config import (
    GAP_GRACE_SECONDS,
    OBJECT_SUFFIX,
    ConfigError,
    ServerConfig,
    ensure_certificate,
    load_config,
    object_key,
    seal_context,
    thumbprint_of,
)
from replication.dataplane.process_server.process import ProcessServerProcess, main, serve, spawn
from replication.dataplane.process_server.server import ProcessServer

__all__ = [
    "GAP_GRACE_SECONDS",
    "OBJECT_SUFFIX",
    "ConfigError",
    "ProcessServer",
    "ProcessServerProcess",
    "ServerConfig",
    "ensure_certificate",
    "load_config",
    "main",
    "object_key",
    "seal_context",
    "serve",
    "spawn",
    "thumbprint_of",
]
