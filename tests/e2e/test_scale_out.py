"""Scale-out on the engines Lifeboat already uses, on real parts: two Celery worker processes
(as if on two machines) and two process-server processes serving one vault, a Redis broker
of the test's own, the test database, the simulated VMware site's VMs writing through their
real agents.

- Items spread over the process servers: enabling replication without naming one gives each
  item the least loaded; each process server ingests exactly its own items.
- An item switched from one process server to the other while its VM writes: no new copy
  (the agent's pass and the bytes the new server received say so), recovery points go on,
  and a point after the switch is byte-equal to the source at a quiesced moment.
- Apply never runs twice at once for one item: every apply pass of both workers is recorded
  (tests/e2e/scaleout_worker.py) and no two passes of an item overlap, each taking the item
  up where the previous one left it; the replicas end byte-exact.
- A worker SIGKILLed in the middle of a job loses no job: the reaper runs it again on the
  other worker, and every job ends SUCCEEDED with byte-exact replicas.
- A process server started by the number registers itself (``manage.py
  process_server_serve``), and docker-compose.yml scales workers and process servers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from django.db import connection

from core.choices import JobState
from core.models import Job
from replication.choices import ProtectionState as P
from replication.models import MobilityAgent, ProtectedItem, RecoveryPoint
from tests.conftest import bookmarked_point, peer_missing, wait_for
from tests.e2e.harness import MiB, Site, free_port, process_server, sha256_file
from vault.models import Event, ProcessServer

pytestmark = pytest.mark.timeout(1200)

ROOT = Path(__file__).resolve().parents[2]
ITEMS = "/api/v1/replicationProtectedItems"
# The VM that switches process server writes slowly: all it writes during the test is a
# fraction of its disks, so a new full copy could not hide among its writes.
VMS = [
    {"name": "web-1", "disks": [4 * MiB], "workload": {"rate_bytes_per_s": 64 * 1024, "write_size": 16 * 1024, "pattern": "uniform"}},
    {"name": "db-1", "disks": [8 * MiB, 4 * MiB],
     "workload": {"rate_bytes_per_s": 16 * 1024, "write_size": 4096, "pattern": "hotspot"}},
    {"name": "app-1", "disks": [4 * MiB], "workload": {"rate_bytes_per_s": 64 * 1024, "write_size": 16 * 1024, "pattern": "uniform"}},
]


class Stack:
    """The site (vault, policy, simulated VMware site, agents), a Redis broker, two process
    servers, the Celery worker processes and a beat, each worker its own process tree."""

    def __init__(self, tmp: Path, live_url: str, broker: str) -> None:
        from replication.process_servers import process_server_config
        from vault.services import process_server_create

        self.tmp = tmp
        self.site = Site(tmp=tmp, live_url=live_url, vms=VMS)
        self.ps_b = process_server_create(vault=self.site.vault, name="ps-b", host="127.0.0.1", data_port=free_port())
        self.servers = {self.site.ps.pk: self.site.ps, self.ps_b.pk: self.ps_b}
        self.configs = {}
        for server in self.servers.values():
            config = process_server_config(server=server, cache_dir=str(tmp / f"{server.name}-cache"))
            config["report_interval"] = 1.0
            self.configs[server.pk] = config
        db = connection.settings_dict
        self.db_url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        self.apply_log = tmp / "apply.jsonl"
        self.env = {
            **os.environ,
            "CELERY_BROKER_URL": broker,
            # The workers' local storage is the site's (tmp/storage), the agents' config URL the live server.
            "LIFEBOAT_DATA_DIR": str(tmp),
            "LIFEBOAT_CONFIG_URL": live_url,
            # The reaper acts within seconds here, not minutes.
            "LIFEBOAT_JOB_HEARTBEAT_TIMEOUT": "20",
            "LIFEBOAT_JOB_QUEUE_TIMEOUT": "10",
            "LIFEBOAT_TEST_APPLY_LOG": str(self.apply_log),
            "PYTHONUNBUFFERED": "1",
        }
        self.workers: dict[str, subprocess.Popen] = {}
        self.worker_pids: dict[str, set[int]] = {}
        self.killed: dict[str, float] = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.ps_exit = ExitStack()
        self.written: dict[str, int] = {}  # VM uuid -> bytes the workload wrote
        self._written_lock = threading.Lock()

    # -- process servers

    def start_process_servers(self) -> None:
        for server in self.servers.values():
            workdir = self.tmp / server.name
            workdir.mkdir()
            self.ps_exit.enter_context(process_server(self.configs[server.pk], workdir))
        wait_for(lambda: all(ProcessServer.objects.get(pk=pk).thumbprint for pk in self.servers), timeout=60,
                 message="both process servers to report their certificates")

    def ps_status(self, server: ProcessServer) -> dict:
        from replication.dataplane.auth import STATUS_SUBJECT, issue_token
        from tests.dataplane.fixtures_ps import https_request
        from vault.services import vault_keys

        token = issue_token(vault_keys(vault=server.vault)[1], STATUS_SUBJECT)
        answer = https_request(server.data_port, "GET", "/v1/status", headers={"Authorization": f"Bearer {token}"})
        assert answer.status == 200, answer.body
        return answer.body

    # -- workers

    def start_worker(self, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        env = {**self.env, "DATABASE_URL": f"{self.db_url}?application_name={name}"}
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.e2e.scaleout_worker", "worker",
             "-Q", "control,data,apply,maintenance", "--pool", "prefork", "-c", "2", "-n", f"{name}@%h",
             "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        wait_for(lambda: b" ready." in (self.tmp / f"{name}.log").read_bytes() or self.workers[name].poll() is not None,
                 timeout=120, message=f"worker {name} to start")
        assert self.workers[name].poll() is None, (self.tmp / f"{name}.log").read_text()[-3000:]

    def note_worker_pids(self) -> None:
        import psutil

        for name, proc in self.workers.items():
            if proc.poll() is None:
                tree = psutil.Process(proc.pid)
                self.worker_pids.setdefault(name, set()).update({proc.pid, *(c.pid for c in tree.children(recursive=True))})

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker's whole process tree: no goodbye, nothing acknowledged."""
        self.note_worker_pids()
        proc = self.workers.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.killed[name] = time.monotonic()

    # -- beat: what celery beat sends, faster

    def start_beat(self) -> None:
        from lifeboat.celery import app

        def run() -> None:
            n = 0
            while not self._stop.wait(1.0):
                n += 1
                app.send_task("replication.apply_sweep")
                app.send_task("core.wake_jobs")
                if n % 2 == 0:
                    app.send_task("core.reap_jobs")

        self._beat = threading.Thread(target=run, daemon=True, name="beat")
        self._beat.start()

    # -- the VMs' writes, counted per VM

    def start_workload(self) -> threading.Event:
        from vault.connectors.simsite import run_workload

        def counted(vm_uuid: str, disk_key: int, offset: int, data: bytes) -> None:
            with self._written_lock:
                self.written[vm_uuid] = self.written.get(vm_uuid, 0) + len(data)

        stop = threading.Event()
        t = threading.Thread(target=run_workload, args=(self.site.site, stop), kwargs={"seed": 11, "on_write": counted},
                             daemon=True)
        t.start()
        stop.thread = t
        return stop

    def written_to(self, machine) -> int:
        with self._written_lock:
            return self.written.get(machine.instance_uuid, 0)

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        for name in list(self.workers):
            proc = self.workers.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
        self.site.close()
        self.ps_exit.close()


@pytest.fixture
def stack(tmp_path, live_server, monkeypatch):
    if shutil.which("redis-server") is None:
        peer_missing("redis-server is not installed (the scale-out test runs a broker of its own)")
    from lifeboat.celery import app

    port = free_port()
    redis_log = open(tmp_path / "redis.log", "wb")
    redis_proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no"], stdout=redis_log, stderr=subprocess.STDOUT)
    broker = f"redis://127.0.0.1:{port}/0"

    def redis_up() -> bool:
        import redis

        try:
            return redis.Redis(port=port).ping()
        except redis.ConnectionError:
            return False

    wait_for(redis_up, timeout=30, message="the test's Redis server")
    # This process sends job messages too (on commit, and the beat's): to the test's broker.
    # Celery takes CELERY_BROKER_URL from the environment before its configuration; its
    # connection and producer pools were made for the session's broker: fresh ones for the
    # test, the session's back after it. (Not app.close(): that would unregister the app,
    # and tasks imported later would never be added to it.)
    monkeypatch.setenv("CELERY_BROKER_URL", broker)
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)
    s = Stack(tmp_path, live_server.url, broker)
    try:
        yield s
    finally:
        s.close()
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
        redis_log.close()
        for log in sorted(tmp_path.glob("worker-*.log")):  # for a failure's report
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


# --- helpers --------------------------------------------------------------------------------------


def _job(job_id, timeout: float = 300) -> Job:
    return wait_for(lambda: Job.objects.filter(pk=job_id, state__in=JobState.TERMINAL).first(), timeout=timeout,
                    interval=0.5, message=f"job {job_id}")


def _enable_all(stack: Stack, api) -> dict[str, str]:
    """Enable every VM through the API without naming a process server; {VM name: job id}."""
    jobs = {}
    for vm in VMS:
        machine = stack.site.vault.machines.get(name=vm["name"])
        r = api.post(f"{ITEMS}/", {"vault": stack.site.vault.pk, "machine": machine.pk, "policy": stack.site.policy.pk},
                     format="json")
        assert r.status_code == 202, r.content
        jobs[vm["name"]] = r.data["id"]
    return jobs


def _image_sha(api, point: RecoveryPoint, disk: int) -> str:
    response = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/{disk}/image")
    assert response.status_code == 200, response.content[:300]
    h = hashlib.sha256()
    for chunk in response.streaming_content:
        h.update(chunk)
    return h.hexdigest()


def _quiesced_points_match_sources(stack: Stack, api, items: list[ProtectedItem], writer) -> None:
    """Stop the writer, note each source disk's bytes, cut an app-consistent point of each VM
    there and compare every disk's image at that point with the source, byte for byte."""
    from replication.scheduling import protected_item_app_consistent_snapshot

    writer.set()
    writer.thread.join(timeout=20)
    for item in items:
        shas = {d.index: sha256_file(stack.site.site.disk_path(item.machine.instance_uuid, d.source_disk_key))
                for d in item.replica_disks.all()}
        bookmark = protected_item_app_consistent_snapshot(item=ProtectedItem.objects.get(pk=item.pk))
        point = bookmarked_point(item, bookmark, timeout=180, interval=0.5, message=f"an app-consistent point of {item.name}")
        assert point.type == "app_consistent"
        for disk, sha in shas.items():
            assert _image_sha(api, point, disk) == sha, f"{item.name} disk {disk} at {point.point_id} differs from the source"


def _apply_passes(stack: Stack) -> dict[str, list[dict]]:
    """The apply passes the workers recorded, per item, in the order they started."""
    passes: dict[str, dict] = {}
    for line in stack.apply_log.read_text().splitlines():
        rec = json.loads(line)
        p = passes.setdefault(rec["pass_id"], {"item": rec["item"], "pid": rec["pid"]})
        p[rec["event"]] = rec["t"]
        if rec["event"] == "end":
            p.update({k: rec[k] for k in ("applied_seq", "batches", "error") if k in rec})
    by_item: dict[str, list[dict]] = {}
    for p in passes.values():
        by_item.setdefault(p["item"], []).append(p)
    for item_passes in by_item.values():
        item_passes.sort(key=lambda p: p["start"])
    return by_item


def _worker_of(stack: Stack, pid: int) -> str:
    return next(name for name, pids in stack.worker_pids.items() if pid in pids)


# --- the tests ------------------------------------------------------------------------------------


def test_items_spread_over_two_process_servers_one_switches_and_apply_never_runs_twice(stack, api):
    site = stack.site
    writer = stack.start_workload()
    stack.start_process_servers()
    site.start_agents()
    stack.start_worker("worker-a")
    stack.start_worker("worker-b")
    stack.start_beat()
    jobs = _enable_all(stack, api)
    for name, job_id in jobs.items():
        job = _job(job_id, timeout=400)
        assert job.state == JobState.SUCCEEDED, f"{name}: {job.error}"
    items = {i.name: i for i in ProtectedItem.objects.select_related("machine", "process_server")}
    assert all(i.protection_state == P.PROTECTED for i in items.values())

    # Spread: each process server took items (least loaded first), and ingests exactly its own.
    served = {pk: {str(i.pk) for i in items.values() if i.process_server_id == pk} for pk in stack.servers}
    assert sorted(len(s) for s in served.values()) == [1, 2], served
    for pk, server in stack.servers.items():
        ingested = stack.ps_status(server)["items"]
        assert set(ingested) == served[pk], f"{server.name} ingests {set(ingested)}, serves {served[pk]}"
        for item_id in served[pk]:
            item = next(i for i in items.values() if str(i.pk) == item_id)
            capacity = sum(d.capacity_bytes for d in item.replica_disks.all())
            assert ingested[item_id]["received_bytes"] >= capacity  # its initial copy came in here

    # Switch process server while the VM writes: db-1 goes to the server that does not have it.
    item = items["db-1"]
    old = item.process_server
    new = next(s for pk, s in stack.servers.items() if pk != old.pk)
    wait_for(lambda: RecoveryPoint.objects.filter(item=item, type="crash_consistent").count() >= 2, timeout=120,
             message="recovery points before the switch")
    agent_dir = os.path.join(site.site_dir, "agents", item.machine.instance_uuid)
    from mobility.state import load_item_state

    before = load_item_state(agent_dir, item.pk)
    assert before.phase == "delta" and before.pass_kind == "initial"
    capacity = sum(d.capacity_bytes for d in item.replica_disks.all())
    written_before = stack.written_to(item.machine)
    r = api.post(f"{ITEMS}/{item.pk}/changeProcessServer/", {"process_server": new.pk}, format="json")
    assert r.status_code == 202, r.content
    again = api.post(f"{ITEMS}/{item.pk}/changeProcessServer/", {"process_server": new.pk}, format="json")
    assert again.status_code == 409 and "switching process server already" in again.json()["error"]["message"]
    job = _job(r.data["id"], timeout=300)
    assert job.state == JobState.SUCCEEDED, job.error
    assert [s["state"] for s in job.steps] == ["SUCCEEDED"] * 5, job.steps
    through = job.result["from_seq"] - 1
    assert through > 0 and job.result["acked_seq"] > through
    item.refresh_from_db()
    assert item.process_server_id == new.pk and item.protection_state == P.PROTECTED
    assert Event.objects.filter(kind="process_server_switched", protected_item=item).exists()

    # Recovery points keep coming: a point of a batch the new server took in.
    wait_for(lambda: RecoveryPoint.objects.filter(item=item, seq__gt=through).exists(), timeout=120,
             message="a recovery point after the switch")
    # No new copy: the agent never began another pass (an initial copy or a resync would be
    # one), and the new server received only what the VM wrote, a fraction of its disks.
    after = load_item_state(agent_dir, item.pk)
    assert after.phase == "delta" and after.pass_kind == "initial"
    assert after.pass_done_seq == before.pass_done_seq and after.acked_seq > through
    received = stack.ps_status(new)["items"][str(item.pk)]["received_bytes"]
    written = stack.written_to(item.machine)
    assert 0 < received < capacity / 2, (received, capacity)
    # Batches carry each write once, with a small header per record and batch; what the
    # agent held unsent when the switch began (under a second of writes) may come too.
    assert received <= 1.25 * (written - written_before) + 256 * 1024, (received, written - written_before)
    assert not Event.objects.filter(protected_item=item, kind__in=["resync_required", "initial_replication_done"],
                                    created_at__gt=job.created_at).exists()
    old_status = stack.ps_status(old)["items"][str(item.pk)]
    assert old_status["uploaded_seq"] == old_status["acked_seq"] <= through

    # Every item's replica against its source at a quiesced moment (db-1's point is after the switch).
    _quiesced_points_match_sources(stack, api, list(items.values()), writer)

    # Apply never ran twice at once for one item, over both workers.
    stack.note_worker_pids()
    passes = _apply_passes(stack)
    workers_per_item = {}
    for item_id, item_passes in passes.items():
        assert all("end" in p and "error" not in p for p in item_passes), item_passes
        for prev, nxt in zip(item_passes, item_passes[1:]):
            assert nxt["start"] >= prev["end"], f"two apply passes of item {item_id} overlapped: {prev} {nxt}"
            assert nxt["applied_seq"] - nxt["batches"] == prev["applied_seq"], (
                f"an apply pass of item {item_id} did not start where the previous one ended: {prev} {nxt}")
        workers_per_item[item_id] = {_worker_of(stack, p["pid"]) for p in item_passes}
        assert ProtectedItem.objects.get(pk=item_id).applied_seq == item_passes[-1]["applied_seq"]
    assert set(passes) == {str(i.pk) for i in items.values()}
    # Both workers applied, and applied the same items (one at a time).
    assert all(w == {"worker-a", "worker-b"} for w in workers_per_item.values()), workers_per_item


def test_a_worker_killed_in_the_middle_of_a_job_loses_no_job(stack, api):
    site = stack.site
    writer = stack.start_workload()
    stack.start_process_servers()
    site.start_agents()
    stack.start_worker("worker-a")
    stack.start_worker("worker-b")
    stack.start_beat()
    # The enables of the items going to ps-b stop in their initial-replication step, in a
    # worker, on ps-b's row (the initial-copy slots are counted under its lock) while this
    # test holds it from a connection of its own; ps-b's heartbeats go on (a key-share lock
    # lets updates through).
    import psycopg2

    lock = psycopg2.connect(stack.db_url + "?application_name=scale-out-test")
    try:
        with lock.cursor() as cur:
            cur.execute("SELECT 1 FROM vault_processserver WHERE id = %s FOR KEY SHARE", [stack.ps_b.pk])
        jobs = _enable_all(stack, api)

        def blocked_worker() -> str | None:
            with connection.cursor() as cur:
                cur.execute("SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock' AND application_name LIKE %s", ["worker-%"])
                row = cur.fetchone()
            return row[0] if row else None

        victim = wait_for(blocked_worker, timeout=300, interval=0.2, message="an enable job to be mid-step in a worker")
        assert Job.objects.filter(pk__in=jobs.values(), state=JobState.RUNNING).exists()
        stack.kill_worker(victim)
    finally:
        lock.rollback()  # the killed worker's job is silent from now on
        lock.close()
    survivor = next(iter(stack.workers))
    for name, job_id in jobs.items():
        job = _job(job_id, timeout=500)
        assert job.state == JobState.SUCCEEDED, f"{name}: {job.error}"
        assert [s["state"] for s in job.steps] == ["SUCCEEDED"] * 5, job.steps
    # Run again on the other worker: the jobs the killed one held, stopped on ps-b's row.
    rerun = [j for j in Job.objects.filter(pk__in=jobs.values()) if j.memo.get("workers_lost")]
    assert rerun and {j.memo["workers_lost"] for j in rerun} == {1}, [j.memo for j in rerun]
    held = {str(i.pk) for i in ProtectedItem.objects.filter(process_server=stack.ps_b)}
    assert {j.target_id for j in rerun} <= held
    assert stack.workers[survivor].poll() is None
    items = list(ProtectedItem.objects.select_related("machine"))
    assert len(items) == len(VMS) and all(i.protection_state == P.PROTECTED for i in items)
    assert MobilityAgent.objects.count() == len(VMS)
    _quiesced_points_match_sources(stack, api, items, writer)


def test_a_process_server_started_by_the_number_registers_itself(live_server, tmp_path, settings):
    """``manage.py process_server_serve`` as docker-compose.yml runs it: the first start makes
    the process server's row and starts it (its heartbeat reaches the vault); a restart on
    the same state directory is the same process server at its new address."""
    from tests.factories import VaultFactory

    settings.LIFEBOAT_STORAGE = {"kind": "local", "root": str(tmp_path / "storage")}
    vault = VaultFactory(name="scaled")
    state = tmp_path / "ps-state"
    db = connection.settings_dict
    env = {**os.environ, "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
           "LIFEBOAT_DATA_DIR": str(tmp_path), "LIFEBOAT_CONFIG_URL": live_server.url, "LIFEBOAT_PS_VAULT": "scaled",
           "LIFEBOAT_PS_STATE_DIR": str(state), "LIFEBOAT_PS_HOST": "127.0.0.1", "LIFEBOAT_PS_LISTEN": "127.0.0.1",
           # The command runs the system checks, which refuse the embedded keys the tests use.
           "LIFEBOAT_DEMO": "1"}
    log_path = tmp_path / "ps.log"

    def registered(predicate, message: str):
        try:
            return wait_for(predicate, timeout=120, message=message)
        except pytest.fail.Exception:
            print(log_path.read_text(errors="replace")[-3000:])
            raise

    def start(port: int) -> subprocess.Popen:
        log = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, "manage.py", "process_server_serve", "--port", str(port)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return proc

    def stop(proc: subprocess.Popen) -> None:
        proc.terminate()
        proc.wait(timeout=30)

    first_port = free_port()
    proc = start(first_port)
    try:
        server = registered(lambda: ProcessServer.objects.filter(vault=vault, thumbprint__gt="").first(),
                            "the process server to register and report")
        assert (server.host, server.data_port) == ("127.0.0.1", first_port)
        assert server.name.startswith("ps-")
    finally:
        stop(proc)
    assert oct((state / "process-server.json").stat().st_mode & 0o777) == "0o600"
    second_port = free_port()
    proc = start(second_port)
    try:
        registered(lambda: ProcessServer.objects.get(pk=server.pk).data_port == second_port,
                   "the restarted process server to take its row again")
        seen = ProcessServer.objects.get(pk=server.pk).last_heartbeat_at
        registered(lambda: ProcessServer.objects.get(pk=server.pk).last_heartbeat_at > seen,
                   "a heartbeat of the restarted process server")
    finally:
        stop(proc)
    again = ProcessServer.objects.get(pk=server.pk)
    assert ProcessServer.objects.filter(vault=vault).count() == 1
    assert again.thumbprint == server.thumbprint  # the same certificate, from its state directory


def test_compose_scales_workers_and_process_servers_without_editing():
    """``docker compose up --scale worker=2 --scale process-server=2`` needs services of those
    names with no fixed container name and no fixed host port."""
    import yaml

    client = shutil.which("docker-compose")
    argv = [client, "config"] if client else None
    if argv is None and shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                                capture_output=True).returncode == 0:
        argv = ["docker", "compose", "config"]
    if argv is None:
        peer_missing("no Compose client (docker-compose or docker compose) to validate docker-compose.yml")
    env = {**os.environ, "SECRET_KEY": "compose-check-" + "k" * 40, "LIFEBOAT_SECRETS_KEY": "compose-check-" + "s" * 40}
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    for name in ("worker", "worker-apply", "process-server"):
        service = services[name]
        assert "container_name" not in service, name
        for port in service.get("ports", []):
            published = port.get("published") if isinstance(port, dict) else str(port).rpartition(":")[0]
            assert not published, f"{name} publishes a fixed host port: {port}"
    assert "jobs@%h" in str(services["worker"]["command"])  # each worker named after its container
    assert "process_server_serve" in str(services["process-server"]["command"])
    # Each process server's identity, cache and certificate: a volume of its own (anonymous).
    own = [v.get("target") if isinstance(v, dict) else str(v) for v in services["process-server"]["volumes"]]
    assert "/var/lib/lifeboat-ps" in own, own
