"""HTTP(S) for the agent, on the standard library alone.

* ``ProcessServerClient``: batches to the process server over HTTPS. The process server's
  certificate is self-signed, so it is not checked against a CA: the agent pins it by the
  SHA-256 thumbprint of its DER form (given in the assignment) and refuses the connection,
  before sending anything, if the thumbprint differs.
* ``JsonClient``: JSON calls to the configuration server (HTTPS with CA checks, a CA file,
  or a pinned thumbprint; plain HTTP only if the URL says so).
* ``RetryPolicy``: bounded retries with exponential backoff and full jitter.
"""
from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import random
import socket
import ssl
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

COALESCE_BYTES = 256 * 1024  # small pieces are gathered into sends of about this size


class TransportError(Exception):
    """A call failed; ``transient`` says whether trying again later may help."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.body = body or {}


class PinMismatch(TransportError):
    def __init__(self, message: str):
        super().__init__(message, transient=False)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max_delay, base * 2**attempt)]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** min(attempt, 30))))

    def run(self, call: Callable[[], Any], *, sleep: Callable[[float], Any] = time.sleep) -> Any:
        """Run ``call`` until it succeeds, fails permanently or runs out of attempts."""
        attempt = 0
        while True:
            try:
                return call()
            except TransportError as e:
                attempt += 1
                if not e.transient or attempt >= self.max_attempts:
                    raise
                sleep(self.delay(attempt))


def normalize_thumbprint(value: str) -> str:
    cleaned = value.replace(":", "").replace(" ", "").strip().lower()
    if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError(f"{value!r} is not a SHA-256 thumbprint (64 hex digits)")
    return cleaned


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, *, thumbprint: str, timeout: float) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # trust comes from the pinned thumbprint below
        super().__init__(host, port, timeout=timeout, context=ctx)
        self._thumbprint = thumbprint

    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True) or b""
        seen = hashlib.sha256(der).hexdigest()
        if not hmac.compare_digest(seen, self._thumbprint):
            self.sock.close()
            self.sock = None
            raise PinMismatch(
                f"{self.host}:{self.port} presented a certificate with thumbprint {seen}, "
                f"not the pinned {self._thumbprint}; refusing to send"
            )


def _split_url(url: str) -> tuple[str, str, int, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def plain_http_warning(url: str) -> str | None:
    """A loud warning when ``url`` is plain HTTP to another machine than this one: the vault
    passphrase and the agent's token would cross the network in clear. None otherwise."""
    scheme, host, _, _ = _split_url(url)
    if scheme != "http":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            return None
    return (f"INSECURE: registering with {url} over plain HTTP: the vault passphrase and this agent's "
            "token cross the network unencrypted and can be read or replayed by anyone on the way. "
            "Use an https:// configuration-server URL (with --config-ca-file or --config-thumbprint).")


@dataclass(frozen=True)
class BatchAnswer:
    """The process server's answer to a batch: ``outcome`` is "acked", "replayed" or "gap"."""

    outcome: str
    acked_seq: int
    message: str = ""


class ProcessServerClient:
    """One keep-alive HTTPS connection to a process server (use one per concurrent sender)."""

    def __init__(self, url: str, *, thumbprint: str, timeout: float = 60.0) -> None:
        scheme, self.host, self.port, self.base = _split_url(url)
        if scheme != "https":
            raise ValueError(f"the process server must be reached over https, not {url!r}")
        self.thumbprint = normalize_thumbprint(thumbprint)
        self.timeout = timeout
        self._conn: _PinnedHTTPSConnection | None = None
        self._last_headers: dict[str, str] = {}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _exchange(self, send: Callable[[http.client.HTTPConnection], None], what: str) -> tuple[int, bytes]:
        """One request on the pinned connection (reopened as needed): (status, body bytes).
        A broken connection is closed and reported as a transient TransportError."""
        if self._conn is None:
            self._conn = _PinnedHTTPSConnection(self.host, self.port, thumbprint=self.thumbprint,
                                                timeout=self.timeout)
        try:
            send(self._conn)
            resp = self._conn.getresponse()
            raw = resp.read()
            self._last_headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                self.close()
        except PinMismatch:
            self.close()
            raise
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise TransportError(f"{what} {self.host}:{self.port} failed: {e!r}", transient=True) from None
        return resp.status, raw

    def send_batch(self, *, item_id: uuid.UUID, token: str, seq: int, parts: Iterable[bytes | memoryview],
                   size: int) -> BatchAnswer:
        """POST one batch once; raises TransportError (transient or not) on failure."""
        def send(conn: http.client.HTTPConnection) -> None:
            conn.putrequest("POST", f"{self.base}/v1/items/{item_id}/batches", skip_accept_encoding=True)
            conn.putheader("Authorization", f"Bearer {token}")
            conn.putheader("Content-Type", "application/vnd.lifeboat.batch")
            conn.putheader("Content-Length", str(size))
            conn.putheader("X-Lifeboat-Seq", str(seq))
            conn.endheaders()
            _send_parts(conn, parts)

        status, raw = self._exchange(send, f"sending batch {seq} to")
        body = _json_or_empty(raw)
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        detail = err.get("message") or raw[:200].decode("utf-8", "replace")
        message = f"process server answered {status} {err.get('code', '')}: {detail}"
        if status == 200:
            return BatchAnswer("acked", int(body["acked_seq"]))
        if status == 409 and err.get("code") == "replayed_batch":
            return BatchAnswer("replayed", int(body["acked_seq"]), message)
        if status == 409 and err.get("code") == "sequence_gap":
            return BatchAnswer("gap", int(body["acked_seq"]), message)
        transient = status in (408, 429) or status >= 500
        raise TransportError(message, transient=transient, status=status, body=body)

    def item_state(self, *, item_id: uuid.UUID, token: str) -> int:
        """The seq the process server last acknowledged for the item."""
        return int(self.item_position(item_id=item_id, token=token)["acked_seq"])

    def item_position(self, *, item_id: uuid.UUID, token: str) -> dict:
        """Where the item's stream stands at the process server: ``acked_seq`` (the last batch
        it acknowledged), ``uploaded_seq`` (the last it put in storage), ``receiving_batches``
        (batches arriving now). Asking lines the server up with storage first."""
        status, raw = self._exchange(
            lambda conn: conn.request("GET", f"{self.base}/v1/items/{item_id}",
                                      headers={"Authorization": f"Bearer {token}"}),
            f"asking for item {item_id} at",
        )
        body = _json_or_empty(raw)
        if status != 200:
            raise TransportError(f"process server answered {status}: {body or raw[:200]!r}",
                                 transient=status >= 500, status=status, body=body)
        if not isinstance(body.get("acked_seq"), int):
            raise TransportError(f"process server answered without acked_seq: {raw[:200]!r}", transient=True,
                                 status=status, body=body)
        return body

    def replica_digests(self, *, item_id: uuid.UUID, token: str, disk: int, min_seq: int,
                        groups: str | None = None) -> "DigestAnswer":
        """The replica's group digests of a disk (or, with ``groups`` like ``"0-3,7"``, the
        4 KiB block digests of those groups), computed at an applied seq of at least
        ``min_seq``. "absent" is a process server that does not serve digests (404)."""
        path = f"{self.base}/v1/items/{item_id}/digests/{int(disk)}"
        query = {"min_seq": str(int(min_seq))}
        if groups is not None:
            path += "/blocks"
            query["groups"] = groups
        url = f"{path}?{urllib.parse.urlencode(query, safe=',-')}"

        def send(conn: http.client.HTTPConnection) -> None:
            conn.request("GET", url, headers={"Authorization": f"Bearer {token}"})

        status, raw = self._exchange(send, f"asking for the replica's digests of item {item_id} at")
        if status == 200:
            resp_headers = self._last_headers
            return DigestAnswer("ready", raw, int(resp_headers.get("x-lifeboat-applied-seq", "0")),
                                int(resp_headers.get("x-lifeboat-disk-size", "-1")))
        if status == 202:
            try:
                retry = float(self._last_headers.get("retry-after", "1"))
            except ValueError:
                retry = 1.0
            return DigestAnswer("pending", b"", 0, -1, retry_after=retry)
        if status == 404:
            return DigestAnswer("absent", b"", 0, -1)
        body = _json_or_empty(raw)
        raise TransportError(f"process server answered {status} to a digest request: {body or raw[:200]!r}",
                             transient=status in (408, 429) or status >= 500, status=status, body=body)


@dataclass(frozen=True)
class DigestAnswer:
    """``state``: "ready" (``data`` holds the digests), "pending" (ask again after
    ``retry_after`` seconds) or "absent" (the process server does not serve digests)."""

    state: str
    data: bytes
    applied_seq: int
    disk_size: int
    retry_after: float = 0.0


def _send_parts(conn: http.client.HTTPConnection, parts: Iterable[bytes | memoryview]) -> None:
    pending: list[bytes | memoryview] = []
    pending_bytes = 0
    for part in parts:
        n = len(part)
        if n >= COALESCE_BYTES // 4:
            if pending:
                conn.send(b"".join(pending))
                pending, pending_bytes = [], 0
            conn.send(part)
            continue
        pending.append(part)
        pending_bytes += n
        if pending_bytes >= COALESCE_BYTES:
            conn.send(b"".join(pending))
            pending, pending_bytes = [], 0
    if pending:
        conn.send(b"".join(pending))


def _json_or_empty(raw: bytes) -> dict:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class JsonClient:
    """JSON over HTTP(S) to the configuration server."""

    def __init__(self, base_url: str, *, ca_file: str | None = None, thumbprint: str | None = None,
                 timeout: float = 30.0) -> None:
        self.scheme, self.host, self.port, self.base = _split_url(base_url)
        self.ca_file = ca_file
        self.thumbprint = normalize_thumbprint(thumbprint) if thumbprint else None
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.scheme == "http":
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        if self.thumbprint:
            return _PinnedHTTPSConnection(self.host, self.port, thumbprint=self.thumbprint, timeout=self.timeout)
        ctx = ssl.create_default_context(cafile=self.ca_file)
        return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=ctx)

    def call(self, method: str, path: str, *, body: dict | None = None, token: str | None = None) -> dict:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn = self._connection()
        try:
            conn.request(method, self.base + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except PinMismatch:
            raise
        except (OSError, http.client.HTTPException) as e:
            raise TransportError(f"{method} {path} to the configuration server failed: {e!r}",
                                 transient=True) from None
        finally:
            conn.close()
        parsed = _json_or_empty(raw)
        if 200 <= resp.status < 300:
            return parsed
        err = parsed.get("error") if isinstance(parsed.get("error"), dict) else {}
        detail = err.get("message") or parsed.get("detail") or raw[:200].decode("utf-8", "replace")
        raise TransportError(f"{method} {path}: configuration server answered {resp.status}: {detail}",
                             transient=resp.status in (408, 429) or resp.status >= 500,
                             status=resp.status, body=parsed)


def resolve_host() -> str:
    return socket.gethostname()
