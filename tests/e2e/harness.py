"""A whole Lifeboat site in one test: the portal/API (live server), a real Celery worker,
a real process server process, the simulated VMware site writing data, and its agents."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from django.test import override_settings

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def process_server(config: dict, workdir: Path):
    """Start the process server as its own process; yields (proc, thumbprint)."""
    path = workdir / "ps.json"
    path.write_text(json.dumps(config))
    log = open(workdir / "ps.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "replication.dataplane.process_server", "--config", str(path)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    thumb_file = Path(config["cache_dir"]) / "tls" / "thumbprint"
    deadline = time.monotonic() + 30
    while not thumb_file.exists() or not thumb_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the process server did not start: {(workdir / 'ps.log').read_text()[-2000:]}")
        time.sleep(0.05)
    host, port = config["listen"].rsplit(":", 1)
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the process server does not listen: {(workdir / 'ps.log').read_text()[-2000:]}")
            time.sleep(0.05)
    try:
        yield proc, thumb_file.read_text().strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class Site:
    """Everything a protection test needs, set up through the services an admin's clicks call."""

    def __init__(self, *, tmp: Path, live_url: str, vms: list[dict], crash_interval: int = 5, rpo_minutes: int = 1,
                 datastores: tuple[str, ...] | None = None):
        from replication.engine import reset_storage
        from vault import services
        from vault.connectors.simulated import SimulatedSite
        from vault.discovery import connector_for, machines_upsert

        self.tmp = tmp
        self.settings = override_settings(
            LIFEBOAT_STORAGE={"kind": "local", "root": str(tmp / "storage")},
            LIFEBOAT_CONFIG_URL=live_url,
        )
        self.settings.enable()
        reset_storage()
        self.site_dir = tmp / "site"
        # Two hosts always; more datastores for a test that places a new VM on another one.
        SimulatedSite.create(self.site_dir, user="sim-admin", password="sim-password-1", vms=vms,
                             **({"datastores": datastores} if datastores else {}))
        self.vault = services.vault_create(name="e2e", passphrase="e2e-passphrase-long-enough", alert_emails=["ops@example.com"])
        self.policy = services.policy_create(
            vault=self.vault, name="fast", rpo_threshold_minutes=rpo_minutes, crash_consistent_frequency_seconds=crash_interval,
            app_consistent_frequency_hours=0,
        )
        self.ps = services.process_server_create(vault=self.vault, name="ps-e2e", host="127.0.0.1", data_port=free_port())
        self.vcenter = services.vcenter_create(
            vault=self.vault, name="sim", kind="simulated", host=str(self.site_dir), username="sim-admin", password="sim-password-1"
        )
        with connector_for(self.vcenter) as site:
            machines_upsert(vcenter=self.vcenter, vms=site.discover().vms)
        self.site = SimulatedSite(self.site_dir, "sim-admin", "sim-password-1")
        self.site.connect()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def ps_config(self) -> dict:
        from replication.process_servers import process_server_config

        config = process_server_config(server=self.ps, cache_dir=str(self.tmp / "ps-cache"))
        config["report_interval"] = 1.0
        return config

    def start_agents(self, **agent_options) -> None:
        from replication.agent_host import AgentHost

        options = {"heartbeat_interval": 1.0, "assignment_interval": 0.5, **agent_options}
        host = AgentHost(str(self.site_dir), scan_interval=0.2, **options)
        host.stop = self._stop
        self._threads.append(threading.Thread(target=host.run, daemon=True, name="agent-host"))
        self._threads[-1].start()
        self.agent_host = host

    def start_beat(self, interval: float = 1.0) -> None:
        """What celery beat does in production: enqueue the apply sweep every few seconds."""
        from replication.tasks import apply_sweep

        def beat():
            while not self._stop.wait(interval):
                apply_sweep.delay()

        self._threads.append(threading.Thread(target=beat, daemon=True, name="beat"))
        self._threads[-1].start()

    def start_workload(self) -> threading.Event:
        """The VMs write until the returned event is set; ``.thread`` runs them, ``.writes``
        counts the writes journaled so far."""
        from vault.connectors.simsite import run_workload

        stop = threading.Event()
        stop.writes = 0

        def counted(*_write) -> None:
            stop.writes += 1

        t = threading.Thread(target=run_workload, args=(self.site, stop), kwargs={"seed": 7, "on_write": counted},
                             daemon=True)
        t.start()
        stop.thread = t
        return stop

    def write(self, writes: int) -> None:
        """The VMs make at least this many writes, then stop writing."""
        from tests.conftest import wait_for

        writer = self.start_workload()
        try:
            wait_for(lambda: writer.writes >= writes, timeout=60, message=f"{writes} writes by the workload")
        finally:
            writer.set()
            writer.thread.join(timeout=10)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=20)
        for t in getattr(self, "agent_host", None).threads.values() if hasattr(self, "agent_host") else []:
            t.join(timeout=20)
        self.site.close()
        self.settings.disable()
