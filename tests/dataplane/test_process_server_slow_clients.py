"""Slow, idle and greedy clients cannot keep agents out of a process server (real process).

Clients from other loopback addresses than the agent's (127.0.0.0/8 is all this machine)
open three times the server's connections and hold them without using them: no TLS
handshake, a handshake and then nothing, headers at a trickle, a body at a trickle (with a
valid token, so it takes an ingest slot), a first request and then the next one at a
trickle. Meanwhile an agent's transport (``mobility.transport``, with its retries) ships
batches: each is acknowledged and stored, and the server cuts every slow connection.
"""
from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

from mobility.transport import ProcessServerClient, RetryPolicy
from replication.dataplane import process_server, sealing
from replication.dataplane.auth import STATUS_SUBJECT, issue_token

try:
    from tests.dataplane.fixtures_ps import (  # noqa: F401 - fixtures
        https_request, make_batch, ps_config, start_ps, stored_seqs, vault, wait_for,
    )
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from fixtures_ps import (  # type: ignore[no-redef]  # noqa: F401
        https_request, make_batch, ps_config, start_ps, stored_seqs, vault, wait_for,
    )

MAX_CONNECTIONS = 6
HEADER_TIMEOUT = 2
TRICKLE_EVERY = 0.5  # well inside io_timeout: a socket timeout alone would never end these


def tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class SlowClient:
    """One connection from ``source`` that holds its slot without using it, in thread."""

    kind: str
    source: str
    port: int
    item_id: uuid.UUID | None = None
    token: str = ""
    ended: str = ""  # how the server ended it: "closed", or "refused" before TLS
    lasted: float = 0.0

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, daemon=True)
        t.start()
        return t

    def _run(self) -> None:
        started = time.monotonic()
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=90, source_address=(self.source, 0))
        try:
            if self.kind == "tcp-only":  # not even a TLS ClientHello
                self.ended = "closed" if _closed(raw, wait=90) else "open"
                return
            try:
                s = tls_context().wrap_socket(raw)
            except (OSError, ssl.SSLError):
                self.ended = "refused"  # closed at accept: its address held its share
                return
            if self.kind == "tls-idle":
                self.ended = "closed" if _closed(s, wait=90) else "open"
            elif self.kind == "trickled-headers":
                self._trickle(s, f"POST /v1/items/{uuid.uuid4()}/batches HTTP/1.1\r\nHost: x\r\n".encode() * 20)
            elif self.kind == "trickled-body":
                body = make_batch(self.item_id, 1, records=8, size=32 * 1024)
                s.sendall((f"POST /v1/items/{self.item_id}/batches HTTP/1.1\r\nHost: x\r\n"
                           f"Content-Length: {len(body)}\r\nAuthorization: Bearer {self.token}\r\n\r\n").encode())
                self._trickle(s, body)
            elif self.kind == "keep-alive-then-trickle":
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                head = s.recv(4096)
                assert head.startswith(b"HTTP/1.1 200"), head
                self._trickle(s, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" * 20)
        finally:
            self.lasted = time.monotonic() - started
            raw.close()

    def _trickle(self, s: ssl.SSLSocket, data: bytes) -> None:
        for i in range(0, len(data), 8):
            try:
                s.sendall(data[i : i + 8])
            except (OSError, ssl.SSLError):
                self.ended = "closed"
                return
            if _closed(s, wait=TRICKLE_EVERY):
                self.ended = "closed"
                return
        self.ended = "sent everything"


def _closed(s: socket.socket, *, wait: float) -> bool:
    """Whether the server ended the connection (EOF or reset) within ``wait`` seconds; what
    it sends meanwhile (the rest of an answer) is read and dropped."""
    deadline = time.monotonic() + wait
    while True:
        buffered = isinstance(s, ssl.SSLSocket) and s.pending()
        left = deadline - time.monotonic()
        if not buffered and (left <= 0 or not select.select([s], [], [], left)[0]):
            return False
        try:
            if s.recv(4096) == b"":
                return True
        except ssl.SSLWantReadError:
            continue
        except (OSError, ssl.SSLError):
            return True


def status(ps, vault) -> dict:
    token = issue_token(vault.auth_key, STATUS_SUBJECT)
    answer = https_request(ps.port, "GET", "/v1/status", headers={"Authorization": f"Bearer {token}"})
    assert answer.status == 200, answer
    return answer.body


def test_slow_and_idle_clients_are_cut_while_an_agent_ships_its_batches(start_ps, vault):
    ps = start_ps(max_connections=MAX_CONNECTIONS, max_connections_per_address=2, max_ingest=2,
                  header_timeout=HEADER_TIMEOUT, min_body_bytes_per_s=64 * 1024, io_timeout=60)
    kinds = ["tcp-only", "tls-idle", "trickled-headers", "trickled-body", "keep-alive-then-trickle"]
    slow: list[SlowClient] = []
    for n in range(3 * MAX_CONNECTIONS):  # two per address, the most one address may hold
        item_id = uuid.uuid4()
        slow.append(SlowClient(kinds[n % len(kinds)], f"127.0.0.{10 + n // 2}", ps.port,
                               item_id=item_id, token=vault.item_token(item_id)))
    # ... and one address that tries for more: two are let in, the others closed at once
    greedy = [SlowClient("tls-idle", "127.0.0.99", ps.port) for _ in range(5)]
    threads = [c.start() for c in slow + greedy]
    time.sleep(0.5)  # they are all in before the agent starts

    item_id = uuid.uuid4()
    client = ProcessServerClient(ps.url, thumbprint=ps.thumbprint, timeout=60)
    retry = RetryPolicy(max_attempts=30, max_delay=2.0)
    sent = {}
    started = time.monotonic()
    try:
        for seq in range(1, 21):
            body = make_batch(item_id, seq)
            sent[seq] = body
            answer = retry.run(lambda: client.send_batch(item_id=item_id, token=vault.item_token(item_id), seq=seq,
                                                         parts=[body], size=len(body)))
            assert (answer.outcome, answer.acked_seq) == ("acked", seq)
    finally:
        client.close()
    assert time.monotonic() - started < 60, "the agent's batches took over a minute"
    storage = ps.storage()
    wait_for(lambda: stored_seqs(storage, item_id) == list(range(1, 21)), timeout=60, what="the batches in storage")
    for seq, body in sent.items():  # byte for byte what the agent sent, sealed
        sealed = storage.get_object(process_server.object_key(item_id, seq))
        assert sealing.unseal(sealed, key=vault.seal_key, context=process_server.seal_context(item_id, seq)) == body

    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a slow client was never cut"
    ended = {(c.kind, c.source): c.ended for c in slow}
    assert set(ended.values()) == {"closed"}, ended
    assert sorted(c.ended for c in greedy) == ["closed", "closed", "refused", "refused", "refused"]
    for c in slow:
        if c.kind == "trickled-body":  # cut before its body was in: nothing of it kept
            assert stored_seqs(storage, c.item_id) == []
    figures = status(ps, vault)
    assert figures["slow_connections_cut"] >= len(slow) + 2
    assert figures["connections_refused"] >= 3
    log = ps.log()
    for why in ("of connecting (header_timeout)", "(header_timeout)", "(min_body_bytes_per_s 65536)",
                "refusing connections from 127.0.0.99"):
        assert why in log, why


def test_an_idle_keep_alive_connection_is_closed_after_io_timeout(start_ps, vault):
    ps = start_ps(io_timeout=2, header_timeout=30)
    with tls_context().wrap_socket(socket.create_connection(("127.0.0.1", ps.port), timeout=60)) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert _closed(s, wait=30)
        assert 1.5 <= time.monotonic() - started < 30


@pytest.mark.parametrize("change, words", [
    ({"max_connections": 8, "max_connections_per_address": 9}, "'max_connections_per_address' must be from 1 to"),
    ({"max_connections_per_address": -1}, "'max_connections_per_address' must be from 1 to"),
    ({"header_timeout": 0}, "'header_timeout' must be more than 0"),
    ({"io_timeout": 7200}, "'io_timeout' must be more than 0 and at most 3600"),
    ({"min_body_bytes_per_s": -5}, "'min_body_bytes_per_s' must be 0 (no minimum) or more"),
    ({"header_timeout": "soon"}, "'header_timeout' must be a number"),
])
def test_bad_connection_settings_are_refused_with_their_reason(tmp_path, vault, change, words):
    with pytest.raises(process_server.ConfigError) as refused:
        process_server.ServerConfig.from_dict({**ps_config(tmp_path, vault), **change})
    assert words in str(refused.value)


def test_connection_settings_default_to_a_share_of_the_connections(tmp_path, vault):
    cfg = process_server.ServerConfig.from_dict(json.loads(json.dumps(ps_config(tmp_path, vault))))
    assert (cfg.max_connections, cfg.max_connections_per_address) == (256, 128)
    assert (cfg.header_timeout, cfg.io_timeout, cfg.min_body_bytes_per_s) == (10.0, 60.0, 32 * 1024)
    small = process_server.ServerConfig.from_dict({**ps_config(tmp_path, vault), "max_connections": 1})
    assert small.max_connections_per_address == 1
