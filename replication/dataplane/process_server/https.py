"""The process server's HTTPS layer: connections, TLS, routing and the answers.

``HTTPSServer`` accepts connections (at most ``max_connections`` at once, at most
``max_connections_per_address`` from one address) and runs each one's TLS handshake in its
own thread; ``ConnectionGuard`` cuts those that hold a slot without using it (no request,
headers or a body at a trickle, idle too long), so that a slow or hostile client cannot keep
the agents out. ``Handler`` routes a request, checks its token and leaves
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
import socket
import socketserver
import ssl
import threading
import time
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

from replication.dataplane import batch as batch_format
from replication.dataplane import digests as replica_digests
from replication.dataplane.auth import STATUS_SUBJECT, verify_token
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


class ConnectionGuard:
    """Deadlines of the open connections, and how many each client address holds.

    A connection has at most one deadline at a time, set by what it is waiting for:
    from being accepted to the end of its first request's headers (TLS handshake included),
    ``header_timeout``; between requests, ``io_timeout`` for the first byte of the next one,
    then ``header_timeout`` for the rest of its headers; while a body is read,
    ``header_timeout`` plus the body's length at ``min_body_bytes_per_s``. While the server
    itself works on a request or answers it, none (each read or write still has
    ``io_timeout``). A socket timeout alone bounds one read, not a client that sends a byte
    now and then: ``run`` shuts down every connection past its deadline, which ends its
    thread's read at once and frees its slot.
    """

    TICK = 0.25

    def __init__(self, *, per_address: int) -> None:
        self.per_address = per_address
        self.lock = threading.Lock()
        self._deadlines: dict[socket.socket, tuple[float, str, str]] = {}
        self._open: dict[str, int] = {}
        self._refusal_logged: dict[str, float] = {}
        self.cut = 0  # connections shut down past their deadline
        self.refused = 0  # connections closed at once: their address held its share

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; False (count nothing) when that address
        already holds ``per_address``."""
        with self.lock:
            held = self._open.get(address, 0)
            if held >= self.per_address:
                self.refused += 1
                now = time.monotonic()
                if now - self._refusal_logged.get(address, -3600.0) >= 60:
                    self._refusal_logged[address] = now
                    log.warning("refusing connections from %s: it already holds %d, the most one address may "
                                "(max_connections_per_address)", address, held)
                return False
            self._open[address] = held + 1
            return True

    def leave(self, address: str) -> None:
        with self.lock:
            held = self._open.get(address, 0) - 1
            if held > 0:
                self._open[address] = held
            else:
                self._open.pop(address, None)

    def open_connections(self) -> int:
        with self.lock:
            return sum(self._open.values())

    def watch(self, sock: socket.socket, seconds: float | None, why: str = "") -> None:
        """From now on ``sock`` must get what it waits for within ``seconds`` (None: no
        deadline); ``why`` says what, for the log line if it is cut."""
        with self.lock:
            if seconds is None:
                self._deadlines.pop(sock, None)
            else:
                address = self._deadlines[sock][2] if sock in self._deadlines else _peer(sock)
                self._deadlines[sock] = (time.monotonic() + seconds, why, address)

    def forget(self, sock: socket.socket) -> None:
        """Called before the socket is closed: a closed socket's descriptor may be reused by
        the next connection, which must not be shut down in its place."""
        with self.lock:
            self._deadlines.pop(sock, None)

    def run(self, stopping: threading.Event) -> None:
        name_os_thread("ps-guard")
        while not stopping.wait(self.TICK):
            now = time.monotonic()
            with self.lock:
                late = [(sock, why, address) for sock, (deadline, why, address) in self._deadlines.items()
                        if deadline <= now]
                for sock, why, address in late:
                    del self._deadlines[sock]
                    self.cut += 1
                    try:
                        # socket.socket's own shutdown: SSLSocket's would drop its TLS state
                        # under the thread still reading it.
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass
            for _, why, address in late:
                log.info("closed the connection from %s: %s", address, why)


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "a client"


class HTTPSServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, ps: ProcessServer, ctx: ssl.SSLContext) -> None:
        self.ps = ps
        self.ssl_context = ctx
        self.connection_slots = threading.BoundedSemaphore(ps.config.max_connections)
        self.guard = ConnectionGuard(per_address=ps.config.max_connections_per_address)
        self._guard_stop = threading.Event()
        super().__init__(address, handler)
        threading.Thread(target=self.guard.run, args=(self._guard_stop,), name="ps-guard", daemon=True).start()

    def server_close(self) -> None:
        self._guard_stop.set()
        super().server_close()

    def verify_request(self, request, client_address) -> bool:
        # Refused here, in the accepting thread, before it waits for a free slot.
        return self.guard.admit(client_address[0])

    def process_request(self, request, client_address):
        self.connection_slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connection_slots.release()
            self.guard.leave(client_address[0])
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()
            self.guard.leave(client_address[0])

    def finish_request(self, request, client_address):
        # The TLS handshake runs in the connection's own thread, so a slow client cannot
        # hold up accepting others.
        name_os_thread("ps-connection")
        cfg = self.ps.config
        request.settimeout(cfg.io_timeout)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as e:
            log.debug("TLS with %s failed: %s", client_address, e)
            return
        self.guard.watch(tls, cfg.header_timeout,
                         f"no complete request within {cfg.header_timeout:g}s of connecting (header_timeout)")
        try:
            try:
                tls.do_handshake()
            except (OSError, ssl.SSLError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address, e)
                return
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            self.guard.forget(tls)
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
    requests_begun = 0

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    # -- deadlines (ConnectionGuard): what the connection waits for decides how long it may

    def handle_one_request(self) -> None:
        cfg = self.server.ps.config
        if self.requests_begun:  # the first request's deadline runs from the accept
            self.server.guard.watch(self.connection, cfg.io_timeout,
                                    f"idle for {cfg.io_timeout:g}s between requests (io_timeout)")
            try:
                if not self.rfile.peek(1):
                    self.close_connection = True
                    return
            except (OSError, ValueError):
                self.close_connection = True
                return
            self.server.guard.watch(self.connection, cfg.header_timeout,
                                    f"a request's headers took over {cfg.header_timeout:g}s (header_timeout)")
        self.requests_begun += 1
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.working()  # the headers are in: what follows is up to this server
        return ok

    def working(self) -> None:
        """No deadline while the server works on the request (waits for a slot, memory or a
        predecessor, seals, answers)."""
        self.server.guard.watch(self.connection, None)

    def reading_body(self, length: int) -> None:
        """A body of ``length`` bytes is read from now on: it must arrive at
        ``min_body_bytes_per_s`` (with ``header_timeout`` to spare)."""
        cfg = self.server.ps.config
        if cfg.min_body_bytes_per_s <= 0:
            self.working()
            return
        seconds = cfg.header_timeout + length / cfg.min_body_bytes_per_s
        self.server.guard.watch(self.connection, seconds,
                                f"a body of {length} bytes was not in within {seconds:.0f}s "
                                f"(min_body_bytes_per_s {cfg.min_body_bytes_per_s})")

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
            refusal = ps.item_token_refusal(item_id, self._bearer())
            if refusal is not None:
                log.warning("refused the state of item %s to %s: %s", item_id, self.client_address[0], refusal.message)
                self._error(refusal)
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
        refusal = ps.item_token_refusal(item_id, self._bearer())
        if refusal is not None:
            log.warning("refused digests of item %s to %s: %s", item_id, self.client_address[0], refusal.message)
            self._error(refusal)
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
        refusal = ps.item_token_refusal(item_id, token, close=True)
        if refusal is not None:  # checked before a byte of the body is read
            log.warning("refused a batch for item %s from %s: %s", item_id, self.client_address[0], refusal.message)
            raise refusal
        hint = self.headers.get("X-Lifeboat-Seq", "")  # announces the batch before its body is read
        return ps.receive_batch(self, item_id, length, int(hint) if hint.isdigit() and 0 < int(hint) < 2**63 else None)

    def drain(self, left: int) -> None:
        """Read and drop the rest of a refused body so the client can read the answer."""
        self.body_read = True
        buf = bytearray(min(CHUNK_BYTES, max(left, 1)))
        view = memoryview(buf)
        self.reading_body(left)
        try:
            while left:
                n = self.rfile.readinto(view[: min(len(buf), left)])
                if not n:
                    self.close_connection = True
                    return
                left -= n
        finally:
            self.working()

    def _bearer(self) -> str | None:
        value = self.headers.get("Authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    def _error(self, r: Reject) -> None:
        self.server.ps.refused(r.code)  # counted for the metrics endpoint
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

