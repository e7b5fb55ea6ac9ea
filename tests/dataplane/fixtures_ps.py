"""Helpers and fixtures for the process server and mobility agent tests.

Imported by test_process_server.py, test_agent.py and test_nothing_lost_ps.py. The process
server always runs as a real process (``process_server.spawn``); storage is the real local
storage; the only stand-in is ``ConfigServerStub``, a test double of the configuration
server's agent API (register, assignment, heartbeat, events): the real one is the Django
service, tested on its own with a database these tests do not need.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import random
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

from replication.dataplane import batch as batch_format
from replication.dataplane import process_server, sealing
from replication.dataplane.auth import issue_token, item_subject
from replication.dataplane.storage import open_storage

MiB = 1024 * 1024


def wait_for(predicate, *, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Vault:
    """The keys a vault shares with its process servers."""

    auth_key: bytes = field(default_factory=lambda: os.urandom(32))
    seal_key: bytes = field(default_factory=sealing.new_key)

    def item_token(self, item_id: uuid.UUID) -> str:
        return issue_token(self.auth_key, item_subject(item_id))


@pytest.fixture
def vault() -> Vault:
    return Vault()


def ps_config(root, vault: Vault, *, name: str = "ps", port: int = 0, **extra) -> dict:
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "cache_dir": str(root / f"{name}-cache"),
        "auth_key": base64.b64encode(vault.auth_key).decode(),
        "seal_key": base64.b64encode(vault.seal_key).decode(),
        "storage": {"kind": "local", "root": str(root / f"{name}-storage")},
    }
    cfg.update(extra)
    return cfg


class PsRunner:
    """Starts (and restarts) one process server process; kills it at teardown."""

    def __init__(self, root, config: dict, name: str) -> None:
        self.root = root
        self.config = config
        self.name = name
        self.proc: process_server.ProcessServerProcess | None = None

    @property
    def log_path(self) -> str:
        return str(self.root / f"{self.name}.log")

    def start(self) -> "PsRunner":
        self.proc = process_server.spawn(self.config, config_path=str(self.root / f"{self.name}.json"),
                                         log_path=self.log_path, ready_timeout=60)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def port(self) -> int:
        return self.proc.port

    @property
    def thumbprint(self) -> str:
        return self.proc.thumbprint

    @property
    def pid(self) -> int:
        return self.proc.pid

    def storage(self):
        return open_storage(self.config["storage"])

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@pytest.fixture
def start_ps(tmp_path, vault):
    runners: list[PsRunner] = []

    def start(*, name: str = "ps", **extra) -> PsRunner:
        runner = PsRunner(tmp_path, ps_config(tmp_path, vault, name=name, **extra), name).start()
        runners.append(runner)
        return runner

    yield start
    for r in runners:
        r.kill()


# --- talking to a process server directly ---------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: dict
    headers: dict


def https_request(port: int, method: str, path: str, *, headers: dict | None = None, body: bytes = b"",
                  send_body: bool = True, content_length: int | None = None, timeout: float = 30) -> Answer:
    """One HTTPS request on a fresh connection, with full control over what is sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw) as s:
            lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
            length = len(body) if content_length is None else content_length
            if method in ("POST", "PUT") or body:
                lines.append(f"Content-Length: {length}")
            for k, v in (headers or {}).items():
                lines.append(f"{k}: {v}")
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            if send_body and body:
                s.sendall(body)
            f = s.makefile("rb")
            status_line = f.readline().decode()
            if not status_line:
                raise ConnectionError("the process server closed the connection without answering")
            status = int(status_line.split()[1])
            hdrs = {}
            while (line := f.readline().decode().strip()):
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
            raw_body = f.read(int(hdrs.get("content-length", 0)))
            return Answer(status, json.loads(raw_body) if raw_body else {}, hdrs)


def post_batch(ps: PsRunner, item_id: uuid.UUID, token: str | None, body: bytes, **kw) -> Answer:
    headers = dict(kw.pop("headers", {}) or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return https_request(ps.port, "POST", f"/v1/items/{item_id}/batches", headers=headers, body=body, **kw)


def make_batch(item_id: uuid.UUID, seq: int, *, records: int = 4, size: int = 8192, rng: random.Random | None = None,
               flags: int = 0, disk: int = 0) -> bytes:
    rng = rng or random.Random(seq)
    recs = [batch_format.Record(batch_format.KIND_WRITE, disk, 512 * rng.randrange(0, 2048), rng.randbytes(size))
            for _ in range(records)]
    return batch_format.encode(item_id=item_id, seq=seq, source_time_ns=time.time_ns(), records=recs, flags=flags)


# --- what reached storage -------------------------------------------------------------------------------


def stored_seqs(storage, item_id: uuid.UUID) -> list[int]:
    prefix = f"logs/{item_id}/"
    return [int(k[len(prefix):].removesuffix(".lbs")) for k in storage.list_objects(prefix)]


def stored_batches(storage, item_id: uuid.UUID, seal_key: bytes) -> list[batch_format.Batch]:
    """Every log of the item in storage, authenticated and decoded, in seq order."""
    out = []
    for seq in stored_seqs(storage, item_id):
        sealed = storage.get_object(process_server.object_key(item_id, seq))
        plain = sealing.unseal(sealed, key=seal_key, context=process_server.seal_context(item_id, seq))
        b = batch_format.decode(plain)
        assert b.seq == seq and b.item_id == item_id
        out.append(b)
    return out


def replay(batches: list[batch_format.Batch], images: dict[int, str]) -> None:
    """Apply the batches' writes, in order, over disk images (one file per disk index)."""
    files = {i: open(p, "r+b") for i, p in images.items()}
    try:
        for b in batches:
            for r in b.records:
                if r.kind == batch_format.KIND_WRITE:
                    f = files[r.disk]
                    f.seek(r.offset)
                    f.write(r.data)
    finally:
        for f in files.values():
            f.close()


def zero_image(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def make_disk(path: str, size: int, *, seed: int = 1) -> str:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB // 2) + bytes(MiB // 4) + b"lifeboat" * (MiB // 32))
    return path


# --- the configuration server's test double --------------------------------------------------------------


class ConfigServerStub:
    """Test double of the configuration server's agent API: it records every call and
    answers per the contract (register -> agent_id/token; assignment; heartbeat; events)."""

    def __init__(self, *, passphrase: str = "correct horse", items: list[dict] | None = None,
                 tls_dir: str | None = None) -> None:
        self.passphrase = passphrase
        self.items = items or []
        self.agent_id = str(uuid.uuid4())
        self.token = "agent-token-" + uuid.uuid4().hex
        self.calls: list[tuple[str, str, dict, dict]] = []
        self.events: list[dict] = []
        self.heartbeats: list[dict] = []
        self.registrations: list[dict] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a):
                pass

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else {}

            def _send(self, status: int, body: dict | None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {stub.token}"

            def do_POST(self):
                body = self._body()
                stub.calls.append(("POST", self.path, dict(self.headers), body))
                if self.path == "/api/v1/agents/register":
                    if body.get("passphrase") != stub.passphrase:
                        return self._send(403, {"error": {"code": "bad_passphrase",
                                                          "message": "The registration passphrase is not that of any vault."}})
                    stub.registrations.append(body)
                    return self._send(201, {"agent_id": stub.agent_id, "token": stub.token})
                base = f"/api/v1/agents/{stub.agent_id}/"
                if not self.path.startswith(base) or not self._authorized():
                    return self._send(403, {"error": {"code": "bad_token", "message": "Unknown agent or wrong token."}})
                if self.path == base + "heartbeat":
                    stub.heartbeats.append(body)
                    return self._send(204, None)
                if self.path == base + "events":
                    stub.events.append(body)
                    return self._send(204, None)
                return self._send(404, {"error": {"code": "not_found", "message": self.path}})

            def do_GET(self):
                stub.calls.append(("GET", self.path, dict(self.headers), {}))
                if self.path != f"/api/v1/agents/{stub.agent_id}/assignment" or not self._authorized():
                    return self._send(403, {"error": {"code": "bad_token", "message": "Unknown agent or wrong token."}})
                return self._send(200, {"items": stub.items})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thumbprint = None
        scheme = "http"
        if tls_dir:
            cert, key, self.thumbprint = process_server.ensure_certificate(tls_dir)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("kind") == kind]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def config_server():
    servers: list[ConfigServerStub] = []

    def make(**kw) -> ConfigServerStub:
        s = ConfigServerStub(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def assignment_for(ps: PsRunner, vault: Vault, item_id: uuid.UUID, disks: list[tuple[int, str, str | None]],
                   **extra) -> dict:
    """An assignment item as the configuration server sends it."""
    return {
        "item_id": str(item_id),
        "item_token": vault.item_token(item_id),
        "process_server_url": ps.url,
        "process_server_thumbprint": ps.thumbprint,
        "disks": [{"index": i, "key": str(i), "path": p, "journal_dir": j} for i, p, j in disks],
        **extra,
    }


def machine_for(disks: list[tuple[int, str, str | None]], *, name: str = "vm") -> dict:
    """The machine an agent registers for ``assignment_for``'s disks (key = index): the
    agent reads only the disks it registered."""
    return {"name": name, "disks": [{"key": i, "path": p, "capacity_bytes": os.path.getsize(p), "journal_dir": j}
                                    for i, p, j in disks]}


class AnswerDroppingProxy:
    """A TCP relay in front of a process server that can lose answers on the way back, as a
    network fault would: while armed, when the server answers on a connection that has just
    carried at least ``min_request`` bytes, it cuts the connection instead of relaying the
    answer. The server has committed the batch; the agent never hears of it."""

    def __init__(self, target_port: int, *, min_request: int = 64 * 1024) -> None:
        self.target_port = target_port
        self.min_request = min_request
        self.armed = 0  # answers still to drop
        self.dropped = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"sent": 0}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upstream: bool) -> None:
        try:
            while data := src.recv(256 * 1024):
                if upstream:
                    state["sent"] += len(data)
                else:
                    with self._lock:
                        drop = self.armed and state["sent"] >= self.min_request
                        if drop:
                            self.armed -= 1
                            self.dropped += 1
                    if drop:
                        break
                    state["sent"] = 0
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
