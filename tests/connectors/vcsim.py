"""A real vCenter simulator (vcsim) for tests, on a free port, with its own view of its inventory.

Fixtures (import them into a conftest.py to use them elsewhere, as tests/connectors does):

- ``vcsim``: one simulator for the session, default inventory (1 datacenter, a cluster of 3
  hosts, 1 standalone host, 4 VMs, 1 datastore); treat its VMs as shared.
- ``vcsim_factory(**flags)``: a simulator with its own inventory (dc=, cluster=, host=,
  standalone_host=, vm=, ds=, templates=, orphans=, no_guest=, busy=, max_page=,
  password=, ...), stopped when the test ends.
- ``free_port``: a 127.0.0.1 port nothing listens on.

A server gives ``.host``, ``.port``, ``.user``, ``.password``, ``.ca_file``, its certificate's
thumbprints, ``.inventory`` (vcsim's view at start), ``.live_inventory()`` / ``.live_vm(uuid)``
(its view now) and ``.connector(**overrides)`` (a VSphereConnector that trusts its CA).

When vcsim cannot be built or started the tests skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import peer_missing
from vault.connectors.vsphere import VSphereConnector

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-vcsim.sh"
BINARY = REPO / "build" / "vcsim"
START_TIMEOUT = 60.0


def unavailable(reason: str) -> None:
    """Fail under CI=true, skip with the reason elsewhere."""
    peer_missing(f"vcsim is unavailable: {reason}")


class Vcsim:
    """One running vcsim process."""

    def __init__(self, workdir: Path, flags: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.inventory_path = workdir / "inventory.json"
        args = [str(BINARY), "-listen", "127.0.0.1:0", "-inventory-out", str(self.inventory_path),
                "-ca-out", str(workdir / "ca.pem")]
        for flag, value in flags.items():
            name = flag.replace("_", "-")
            args.append(f"-{name}={str(value).lower() if isinstance(value, bool) else value}")
        self.log_path = workdir / "vcsim.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        try:
            ready = self._read_ready_line()
        except Exception:
            self.stop()
            raise
        self.host: str = ready["host"]
        self.port: int = ready["port"]
        self.user: str = ready["user"]
        self.password: str = ready["password"]
        self.ca_file: str = ready["ca_file"]
        self.thumbprint_sha1: str = ready["thumbprint_sha1"]
        self.thumbprint_sha256: str = ready["thumbprint_sha256"]
        self.inventory: dict[str, Any] = json.loads(self.inventory_path.read_text())

    def _read_ready_line(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"vcsim did not report ready within {START_TIMEOUT:.0f}s")
            if not selector.select(timeout=remaining):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"vcsim exited with {self.proc.wait()}: {self.log_path.read_text()[-2000:]}")
            line += chunk
        return json.loads(line.decode())

    def live_inventory(self) -> dict[str, Any]:
        """vcsim's own view of its inventory right now."""
        context = ssl.create_default_context(cafile=self.ca_file)
        url = f"https://{self.host}:{self.port}/lifeboat/inventory"
        with urllib.request.urlopen(url, context=context, timeout=30) as response:
            return json.load(response)

    def live_vm(self, instance_uuid: str) -> dict[str, Any] | None:
        for vm in self.live_inventory()["vms"]:
            if vm["instance_uuid"] == instance_uuid:
                return vm
        return None

    def connector(self, **overrides: Any) -> VSphereConnector:
        params: dict[str, Any] = dict(host=self.host, port=self.port, user=self.user,
                                      password=self.password, ca_file=self.ca_file)
        params.update(overrides)
        return VSphereConnector(**params)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # vcsim exits when stdin closes
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.proc.stdout.close()
        self._log.close()


@pytest.fixture(scope="session")
def vcsim_binary() -> Path:
    """build/vcsim, built by scripts/build-vcsim.sh when needed."""
    try:
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        unavailable(f"building it failed: {exc}")
    if result.returncode != 0 or not BINARY.exists():
        unavailable(f"{BUILD_SCRIPT.name} failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    return BINARY


def _start(workdir: Path, flags: dict[str, Any]) -> Vcsim:
    try:
        return Vcsim(workdir, flags)
    except Exception as exc:
        unavailable(f"it did not start: {exc}")
        raise


@pytest.fixture(scope="session")
def vcsim(vcsim_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    """A simulator shared by the session, with the default inventory."""
    server = _start(tmp_path_factory.mktemp("vcsim"), {})
    yield server
    server.stop()


@pytest.fixture
def vcsim_factory(vcsim_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Vcsim]]:
    """Start a simulator with the given flags (dc=, cluster=, host=, standalone_host=, vm=, ds=, ...)."""
    servers: list[Vcsim] = []

    def start(**flags: Any) -> Vcsim:
        server = _start(tmp_path_factory.mktemp("vcsim"), flags)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
