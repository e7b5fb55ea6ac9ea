#!/usr/bin/env python
"""Run Lifeboat on one machine with the embedded defaults: web, worker, beat, a process
server, the simulated VMware site's workload and its agents, and the workload of the VMs
recovered onto the simulated recovery site, with the recovery site's process server and the
agents of recovered VMs replicating back (failback). Ctrl-C stops everything."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DATA = Path(os.environ.get("LIFEBOAT_DATA_DIR", ROOT / "var")).resolve()

env = dict(os.environ)
env.setdefault("LIFEBOAT_DATA_DIR", str(DATA))
env.setdefault("LIFEBOAT_DEMO", "1")  # the embedded default keys are accepted for the demo only
env.setdefault("EMAIL_BACKEND", "django.core.mail.backends.filebased.EmailBackend")
env.setdefault("EMAIL_FILE_PATH", str(DATA / "mail"))
env.setdefault("PYTHONUNBUFFERED", "1")
env.setdefault("LIFEBOAT_HEARTBEAT_TIMEOUT", "120")
env.setdefault("LIFEBOAT_ALERT_QUIET_SECONDS", "120")

PROCESSES = {
    # The access log leaves out the agents' and process servers' routine calls (lifeboat/weblog.py).
    "web": [PY, "-m", "gunicorn", "lifeboat.wsgi", "-b", "127.0.0.1:8000", "-w", "2", "--threads", "4", "--access-logfile", "-",
            "--logger-class", "lifeboat.weblog.Logger"],
    # Two workers, so that apply passes and sweeps never wait behind the admin's jobs.
    "worker": [PY, "-m", "celery", "-A", "lifeboat", "worker", "-Q", "control,data", "--pool", "threads", "-c", "4", "-n", "jobs@%h", "--loglevel", "INFO"],
    "worker-apply": [PY, "-m", "celery", "-A", "lifeboat", "worker", "-Q", "apply,maintenance", "--pool", "threads", "-c", "6", "-n", "apply@%h", "--loglevel", "INFO"],
    "beat": [PY, "-m", "celery", "-A", "lifeboat", "beat", "--loglevel", "INFO"],
    "process-server": [PY, "-m", "replication.dataplane.process_server", "--config", str(DATA / "process-server-ps-01.json")],
    "simsite": [PY, "-m", "vault.connectors.simsite", "--data-dir", str(DATA / "simsite")],
    "agents": [PY, "-m", "replication.agent_host", "--site-dir", str(DATA / "simsite")],
    # A VM failed over (or test-failed-over) to the demo's recovery site writes to its disks
    # while it runs, like the source VMs: the same runner, on the recovery site's directory.
    "recovery-site": [PY, "-m", "vault.connectors.simsite", "--data-dir", str(DATA / "recovery-site")],
    # Failback: the recovery site's process server, and the agents Lifeboat pushes into the
    # recovered VMs when they are reprotected (replicated back on-premises).
    "process-server-recovery": [PY, "-m", "replication.dataplane.process_server", "--config", str(DATA / "process-server-ps-recovery.json")],
    "recovery-agents": [PY, "-m", "replication.agent_host", "--site-dir", str(DATA / "recovery-site")],
}


def pump(name: str, proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{name:>14} | {line}")


def start(name: str) -> subprocess.Popen:
    proc = subprocess.Popen(PROCESSES[name], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    threading.Thread(target=pump, args=(name, proc), daemon=True).start()
    return proc


RESTART_DELAY = 2.0  # a process that exits is started again after this long, as a service manager would
RESTARTS_PER_MINUTE = 5  # ... unless it keeps exiting: then everything stops


def main() -> int:
    procs: dict[str, subprocess.Popen] = {name: start(name) for name in PROCESSES}
    exits: dict[str, list[float]] = {name: [] for name in PROCESSES}
    print("Lifeboat is starting: http://127.0.0.1:8000 (Ctrl-C stops it)", flush=True)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        for name, proc in list(procs.items()):
            if proc.poll() is None:
                continue
            now = time.monotonic()
            exits[name] = [t for t in exits[name] if now - t < 60] + [now]
            if len(exits[name]) > RESTARTS_PER_MINUTE:
                print(f"{name} exited with {proc.returncode} {len(exits[name])} times within a minute; stopping everything", flush=True)
                stopping = True
                break
            print(f"{name} exited with {proc.returncode}; starting it again in {RESTART_DELAY:.0f} s", flush=True)
            time.sleep(RESTART_DELAY)
            procs[name] = start(name)
        time.sleep(0.5)
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
