"""The process server's HTTPS layer: connections, TLS, routing and the answers.

``HTTPSServer`` accepts connections (at most ``max_connections`` at once) and runs each one's
TLS handshake in its own thread; ``Handler`` routes a request, checks its token and leaves
the work to the ``ProcessServer`` (``receive_batch``, ``digests_for``, ``status``). A request
refused anywhere raises ``Reject``, which ``Handler`` turns into a JSON error answer
``{"error": {"code": ..., "message": ...}}`` (with ``acked_seq`` and ``Retry-After`` where
they help the agent), reading what is left of the body first so the client gets the answer.
"""
from __future__ import annotations

import ctypes
import http.server
import json
import logging
import socketserver
import ssl
import threading
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

from replication.dataplane import batch as batch_format
from replication.dataplane import digests as replica_digests
from replication.dataplane.auth import STATUS_SUBJECT, item_subject, verify_token
from replication.dataplane.process_server.config import CHUNK_BYTES, DIGEST_RETRY_SECONDS, VERSION

if TYPE_CHECKING:  # the server imports this module to start its HTTPS layer
    from replication.dataplane.process_server.server import ProcessServer

log = logging.getLogger("lifeboat.process_server")


class Reject(Exception):
    """A refused request: the HTTP status, an error code and a sentence for the agent;
    ``close`` ends the connection after the answer; ``acked_seq`` and ``retry_after`` go into
    the answer when given."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close, self.extra = status, code, message, close, extra


def name_os_thread(name: str) -> None:
    """Give the OS thread a name (shown by top -H, ps -L) so an operator can see which part
    of the process server uses the CPU."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class HTTPSServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
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
        name_os_thread("ps-connection")
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


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # an ack must not wait for the client's delayed ACK
    server_version = f"Lifeboat-ProcessServer/{VERSION}"
    sys_version = ""
    server: HTTPSServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    def do_GET(self) -> None:
        ps = self.server.ps
        if self.path == "/v1/health":
            self._json(200, {"status": "ok", "version": VERSION, "service": "lifeboat-process-server"})
        elif self.path == "/v1/status":
            if not verify_token(ps.config.auth_key, self._bearer() or "", STATUS_SUBJECT):
                self._error(Reject(401, "unauthenticated", "a valid process-server token is required"))
                return
            self._json(200, ps.status())
        elif self.path.startswith("/v1/items/") and "/digests/" in self.path:
            self._get_digests()
        elif self.path.startswith("/v1/items/"):
            try:
                item_id = uuid.UUID(self.path[len("/v1/items/"):].strip("/"))
            except ValueError:
                self._error(Reject(404, "not_found", f"no such resource: {self.path}"))
                return
            if not verify_token(ps.config.auth_key, self._bearer() or "", item_subject(item_id)):
                log.warning("refused the state of item %s to %s: the token is not valid for this item",
                            item_id, self.client_address[0])
                self._error(Reject(403, "forbidden", f"the token is not valid for item {item_id}"))
                return
            try:
                item = ps._item(item_id)
                ps._sync_floor(item, recheck=True)  # the agent asks where to go on from: be sure
            except Reject as r:
                self._error(r)
                return
            except Exception as e:
                self._error(Reject(503, "storage_unavailable", f"cache storage cannot say where the stream stands ({e})",
                                    retry_after=2))
                return
            with ps.lock:
                state = {"item_id": str(item_id), "acked_seq": item.acked, "uploaded_seq": item.uploaded,
                         "receiving_batches": sum(item.receiving.values())}
            self._json(200, state)
        else:
            self._error(Reject(404, "not_found", f"no such resource: {self.path}"))

    def _get_digests(self) -> None:
        """``GET /v1/items/<id>/digests/<disk>[/blocks]?min_seq=N[&groups=...]``."""
        ps = self.server.ps
        path, _, query = self.path.partition("?")
        parts = path.strip("/").split("/")
        if not (len(parts) == 5 or (len(parts) == 6 and parts[5] == "blocks")) or parts[3] != "digests":
            self._error(Reject(404, "not_found", f"no such resource: {path}"))
            return
        try:
            item_id = uuid.UUID(parts[2])
        except ValueError:
            self._error(Reject(404, "not_found", f"{parts[2]!r} is not an item id"))
            return
        if not verify_token(ps.config.auth_key, self._bearer() or "", item_subject(item_id)):
            log.warning("refused digests of item %s to %s: the token is not valid for this item",
                        item_id, self.client_address[0])
            self._error(Reject(403, "forbidden", f"the token is not valid for item {item_id}"))
            return
        blocks = len(parts) == 6
        try:
            params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
            names = [k for k, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)]
        except ValueError:
            self._error(Reject(400, "bad_request", f"the query {query!r} is malformed"))
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
            self._error(Reject(400, "bad_request", problem))
            return
        disk, min_seq = int(disk_text), int(seq_text)
        if blocks:  # the syntax is checked before anything is read or written
            try:
                replica_digests.parse_groups(params["groups"], group_count=2**62)
            except replica_digests.DigestError as e:
                self._error(Reject(400, "bad_request", str(e)))
                return
        try:
            found = ps.digests_for(item_id, disk, min_seq)
        except Exception as e:
            self._error(Reject(503, "storage_unavailable", f"cache storage cannot give the replica's digests ({e})",
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
                self._error(Reject(400, "bad_request", str(e)))
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
        except Reject as r:
            self._error(r)
            return
        except (TimeoutError, ConnectionError, ssl.SSLError) as e:
            log.info("batch upload from %s aborted: %s", self.client_address[0], e)
            self.close_connection = True
            return
        except Exception as e:  # a fault of this server: say so, to the log and the agent
            log.exception("batch from %s failed", self.client_address[0])
            self._error(Reject(500, "internal_error", f"the process server failed: {type(e).__name__}: {e}",
                                close=True))
            return
        self._json(200, {"acked_seq": acked})

    def do_PUT(self) -> None:
        self.body_read = False
        self._error(Reject(405, "method_not_allowed", "use POST to send a batch", close=True))

    do_DELETE = do_PATCH = do_PUT

    def _batch_item(self) -> uuid.UUID:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) != 4 or parts[0] != "v1" or parts[1] != "items" or parts[3] != "batches":
            raise Reject(404, "not_found", f"no such resource: {self.path}", close=True)
        try:
            return uuid.UUID(parts[2])
        except ValueError:
            raise Reject(404, "not_found", f"{parts[2]!r} is not an item id", close=True) from None

    def _post_batch(self, item_id: uuid.UUID) -> int:
        ps = self.server.ps
        if self.headers.get("Transfer-Encoding"):
            raise Reject(411, "length_required", "send the batch with a Content-Length, not chunked", close=True)
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise Reject(411, "length_required", "a Content-Length header is required", close=True)
        if not raw_length.isdigit():
            raise Reject(400, "bad_request", f"Content-Length {raw_length!r} is not a number", close=True)
        length = int(raw_length)
        if length > batch_format.MAX_BATCH_BYTES:  # refused before a byte of the body is read
            raise Reject(413, "batch_too_large",
                          f"a batch of {length} bytes is over the {batch_format.MAX_BATCH_BYTES}-byte limit",
                          close=True)
        token = self._bearer()
        if token is None:
            raise Reject(401, "unauthenticated", "an 'Authorization: Bearer <item token>' header is required",
                          close=True)
        if not verify_token(ps.config.auth_key, token, item_subject(item_id)):
            log.warning("refused a batch for item %s from %s: the token is not valid for this item",
                        item_id, self.client_address[0])
            raise Reject(403, "forbidden", f"the token is not valid for item {item_id}", close=True)
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

    def _error(self, r: Reject) -> None:
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

