"""The process server's configuration, its TLS certificate, and the names of what it stores.

``ServerConfig.from_dict`` checks the JSON config (``load_config`` reads it from a file) and
says which field is wrong and why. ``ensure_certificate`` makes the self-signed certificate
agents pin by its SHA-256 thumbprint (``thumbprint_of``) on first start. A batch is stored,
sealed with context ``seal_context``, under ``object_key`` in the vault's cache storage
(``open_target_storage``), and the cache holds it under the same suffix.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import socket
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mobility.durable import replace_durably
from replication.dataplane import batch as batch_format
from replication.dataplane import sealing
from replication.dataplane.auth import MAX_GENERATION
from replication.dataplane.storage import StorageError, open_storage

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
    """The process server's settings (the JSON config's fields of the same names).

    Connections, so that clients that hold one without using it cannot fill the server
    (``https.ConnectionGuard`` enforces them):

    ``max_connections``
        Connections served at once (a thread each); more wait to be accepted until one ends.
        The default, 256, serves some 60 replicating items (about four connections each).
    ``max_connections_per_address``
        Connections from one client address at once (default: half of ``max_connections``);
        one more is closed as soon as it is accepted. An agent opens about four per item it
        replicates (its sending window and one to ask where its stream stands).
    ``header_timeout``
        Seconds a connection gets from being accepted to the end of its first request's
        headers (TLS handshake included), and a later request from its first byte to the
        end of its headers.
    ``io_timeout``
        Seconds a connection may stay idle between requests (keep-alive), and that one read
        or write on it may wait; also how long a batch may wait in the server for memory or
        for its predecessor.
    ``min_body_bytes_per_s``
        The slowest a request body may arrive: it must be complete within
        ``header_timeout`` plus its length at this rate (0: no minimum beyond ``io_timeout``
        per read).
    """

    cache_dir: str
    auth_key: bytes
    seal_key: bytes
    storage: dict
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    report_url: str | None = None
    report_token: str | None = None
    report_interval: float = 30.0
    # Where the server tells the vault which items have new logs in storage, so they are
    # applied at once (server._wake_loop); None: the vault's apply sweep finds them. At
    # most one such POST per wake_interval seconds, for all the items with news.
    uploaded_url: str | None = None
    wake_interval: float = 0.2
    max_cache_bytes: int = 16 * 1024**3
    upload_workers: int = 2
    max_ingest: int = 4
    max_connections: int = 256
    # memory for batches being received and sealed (the process server's bound, with about
    # 40 MiB for the rest of it); at least three maximum-size batches
    ingest_memory_bytes: int = SEAL_MEMORY_FACTOR * batch_format.MAX_BATCH_BYTES
    seal_level: int = 1
    io_timeout: float = 60.0
    max_connections_per_address: int = 0  # 0: half of max_connections
    header_timeout: float = 10.0
    min_body_bytes_per_s: int = 32 * 1024
    # Ingest bandwidth this server accepts (bytes/s, 0 = as fast as it can): a sized
    # capacity, as a real process server has; churn above it builds backlog at the agents.
    max_ingest_bytes_per_s: int = 0
    # The lowest valid item token generation per item when the configuration was written
    # (the heartbeat answers keep it current: server.py).
    token_generations: dict[uuid.UUID, int] = field(default_factory=dict)
    # Where the Prometheus metrics are served, plain HTTP without a token (metrics.py):
    # (host, port); port 0 is one the system picks (written to server.json); None: not served.
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 0)

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
            uploaded_url=raw.get("uploaded_url") or None,
        )
        for name, typ in (
            ("report_interval", float),
            ("wake_interval", float),
            ("max_cache_bytes", int),
            ("upload_workers", int),
            ("max_ingest", int),
            ("max_connections", int),
            ("ingest_memory_bytes", int),
            ("seal_level", int),
            ("io_timeout", float),
            ("max_ingest_bytes_per_s", int),
            ("max_connections_per_address", int),
            ("header_timeout", float),
            ("min_body_bytes_per_s", int),
        ):
            if raw.get(name) is not None:
                try:
                    setattr(cfg, name, typ(raw[name]))
                except (TypeError, ValueError):
                    raise ConfigError(f"process server config: '{name}' must be a number") from None
        if "metrics_listen" in raw:
            cfg.metrics_listen = parse_metrics_listen(raw["metrics_listen"])
        if raw.get("token_generations") is not None:
            try:
                cfg.token_generations = parse_token_generations(raw["token_generations"],
                                                                where="process server config")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if cfg.upload_workers < 1 or cfg.max_ingest < 1 or cfg.max_connections < 1:
            raise ConfigError("process server config: worker and connection counts must be 1 or more")
        if not cfg.max_connections_per_address:
            cfg.max_connections_per_address = max(1, cfg.max_connections // 2)
        if not 1 <= cfg.max_connections_per_address <= cfg.max_connections:
            raise ConfigError("process server config: 'max_connections_per_address' must be from 1 to "
                              f"'max_connections' ({cfg.max_connections})")
        if not 0 <= cfg.wake_interval <= 60:
            raise ConfigError("process server config: 'wake_interval' must be from 0 to 60 seconds")
        for name in ("header_timeout", "io_timeout"):
            if not 0 < getattr(cfg, name) <= 3600:
                raise ConfigError(f"process server config: '{name}' must be more than 0 and at most 3600 seconds")
        if cfg.min_body_bytes_per_s < 0:
            raise ConfigError("process server config: 'min_body_bytes_per_s' must be 0 (no minimum) or more")
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


def parse_metrics_listen(raw: Any) -> tuple[str, int] | None:
    """``"HOST:PORT"`` (port 0: any free one) or ``""``/null (no metrics endpoint)."""
    if raw in (None, ""):
        return None
    host, sep, port = str(raw).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"process server config: 'metrics_listen' must be HOST:PORT (or empty: no metrics "
                          f"endpoint), got {raw!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_token_generations(raw: Any, *, where: str) -> dict[uuid.UUID, int]:
    """{item id: lowest valid token generation} from JSON ({"<uuid>": n}); ValueError naming
    ``where`` and the first bad entry."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: token_generations must be an object of item id -> generation")
    out = {}
    for key, value in raw.items():
        try:
            item_id = uuid.UUID(str(key))
        except ValueError:
            raise ValueError(f"{where}: {str(key)[:40]!r} is not an item id") from None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GENERATION:
            raise ValueError(f"{where}: the token generation of item {item_id} must be a whole number from 0 "
                             f"to {MAX_GENERATION}")
        out[item_id] = value
    return out



# --- certificate -----------------------------------------------------------------------------


def thumbprint_of(cert_der: bytes) -> str:
    """The SHA-256 thumbprint agents pin: lowercase hex of the DER certificate's digest."""
    return hashlib.sha256(cert_der).hexdigest()


def ensure_certificate(tls_dir: str, *, host: str = "127.0.0.1") -> tuple[str, str, str]:
    """(cert_path, key_path, thumbprint); makes a self-signed certificate on first use."""
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
        replace_durably(key_path, key_pem, mode=0o600)
        replace_durably(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    with open(cert_path, "rb") as f:
        der = ssl.PEM_cert_to_DER_cert(f.read().decode("ascii"))
    thumb = thumbprint_of(der)
    thumb_path = os.path.join(tls_dir, "thumbprint")
    if not os.path.exists(thumb_path):
        replace_durably(thumb_path, (thumb + "\n").encode())
    return cert_path, key_path, thumb


# --- storage -----------------------------------------------------------------------------------


def open_target_storage(config: dict):
    """The vault's cache storage (``replication.dataplane.storage``)."""
    try:
        return open_storage(config)
    except StorageError as e:
        raise ConfigError(f"process server config: 'storage': {e}") from None


def object_key(item_id: uuid.UUID, seq: int) -> str:
    return f"logs/{item_id}/{seq:020d}{OBJECT_SUFFIX}"


def seal_context(item_id: uuid.UUID, seq: int) -> bytes:
    return f"{item_id}:{seq}".encode()


def load_config(path: str) -> ServerConfig:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read process server config {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"process server config {path} must hold a JSON object")
    return ServerConfig.from_dict(raw)
