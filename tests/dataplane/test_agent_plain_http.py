"""An agent told to register over plain HTTP with another machine warns loudly (log and
standard error); over HTTPS or to this machine it does not."""
from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import uuid

import pytest

from mobility.agent import Agent
from mobility.transport import RetryPolicy, plain_http_warning

FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.05, max_delay=0.1)
MACHINE = {"name": "vm-01", "os": "Linux", "disks": [{"key": 2000, "path": "/dev/sdb", "capacity_bytes": 1 << 30}]}


@pytest.mark.parametrize(
    "url, warns",
    [
        ("http://10.0.0.5:8000", True),
        ("http://lifeboat.example.com", True),
        ("http://[2001:db8::1]:8000", True),
        ("https://lifeboat.example.com", False),
        ("http://127.0.0.1:8000", False),
        ("http://127.3.4.5:8000", False),
        ("http://[::1]:8000", False),
        ("http://localhost:8000", False),
    ],
)
def test_plain_http_warning(url, warns):
    message = plain_http_warning(url)
    assert (message is not None) == warns
    if warns:
        assert message.startswith(f"INSECURE: registering with {url} over plain HTTP")
        assert "passphrase" in message and "https://" in message


def local_address() -> str:
    """This machine's address on its network (not loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        return s.getsockname()[0]


class Registrar:
    """A plain-HTTP configuration server that answers registrations, on every address."""

    def __init__(self) -> None:
        self.agent_id = str(uuid.uuid4())
        registrar = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = json.dumps({"agent_id": registrar.agent_id, "token": "t-" + uuid.uuid4().hex}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_agent_registering_over_plain_http_to_another_host_warns(tmp_path, caplog, capsys):
    address = local_address()
    assert not address.startswith("127.")
    registrar = Registrar()
    try:
        caplog.set_level(logging.WARNING, logger="lifeboat.mobility")
        remote = Agent(state_dir=str(tmp_path / "remote"), config_url=f"http://{address}:{registrar.port}",
                       passphrase="correct horse", machine=MACHINE, retry=FAST_RETRY)
        assert remote.register() == registrar.agent_id
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(w.startswith(f"INSECURE: registering with http://{address}:{registrar.port} over plain HTTP") for w in warnings)
        assert "WARNING: INSECURE: registering with" in capsys.readouterr().err

        caplog.clear()
        local = Agent(state_dir=str(tmp_path / "local"), config_url=f"http://127.0.0.1:{registrar.port}",
                      passphrase="correct horse", machine=MACHINE, retry=FAST_RETRY)
        assert local.register() == registrar.agent_id
        assert not [r for r in caplog.records if "INSECURE" in r.getMessage()]
        assert "INSECURE" not in capsys.readouterr().err
    finally:
        registrar.close()
