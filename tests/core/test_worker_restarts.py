"""Jobs on real worker, beat and broker processes: waiting jobs hold no worker, and killing
and restarting every one of those processes in the middle of twenty jobs loses none.

Each test starts its own Redis server (on a free port, without persistence, so a restart
loses what it held, as a broker restarted without persistence does), a Celery worker of
two processes and a beat, all on the test database. The enable jobs wait for agents that
are not registered yet; the test registers them through the API, then stands in for the
apply engine finishing each initial copy (the same two calls ``item_apply`` makes: the
item's transition to PROTECTED and ``job_wake`` of the item and of its process server's
initial-copy slots), since these items have no source disks to copy.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection, transaction
from rest_framework.test import APIClient

from core.choices import JobState, JobType
from core.jobs import job_wake
from core.models import Job
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem
from replication.services import protected_item_disable, protected_item_enable, protected_item_transition
from replication.waits import initial_slot_wait_key, item_wait_key
from tests.conftest import peer_missing, wait_for
from tests.e2e.harness import free_port
from tests.factories import DiskFactory, MachineFactory, PolicyFactory, ProcessServerFactory, ProtectedItemFactory, VaultFactory
from vault.models import Alert, ProcessServer

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "correct horse battery staple"
JOBS = 20


class Stack:
    """A Redis broker, a two-process Celery worker and a beat, each its own process."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.broker = f"redis://127.0.0.1:{self.port}/0"
        db = connection.settings_dict
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
            "CELERY_BROKER_URL": self.broker,
            "LIFEBOAT_DATA_DIR": str(tmp / "data"),
            "LIFEBOAT_JOB_HEARTBEAT_TIMEOUT": "10",
            "LIFEBOAT_JOB_QUEUE_TIMEOUT": "5",
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts = 0

    def _start(self, name: str, argv: list[str]) -> None:
        self.starts += 1
        log = open(self.tmp / f"{name}-{self.starts}.log", "wb")
        self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start_redis(self) -> None:
        self._start("redis", [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"])
        wait_for(self._redis_up, timeout=30, message="the test's Redis server")

    def _redis_up(self) -> bool:
        import redis

        try:
            return redis.Redis(port=self.port).ping()
        except redis.ConnectionError:
            return False

    def start_worker(self) -> None:
        self._start("worker", [sys.executable, "-m", "celery", "-A", "lifeboat", "worker", "-Q", "control,data,apply,maintenance",
                               "--pool", "prefork", "-c", "2", "--loglevel", "INFO", "-n", f"w{self.starts}@%h"])

    def start_beat(self) -> None:
        self._start("beat", [sys.executable, "-m", "celery", "-A", "lifeboat", "beat", "--loglevel", "INFO",
                             "-s", str(self.tmp / "beat-schedule")])

    def kill(self, name: str) -> None:
        """SIGKILL: no goodbye, no acknowledgement, nothing flushed."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def queue_len(self, queue: str) -> int:
        import redis

        return redis.Redis(port=self.port).llen(queue)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture
def stack(transactional_db, tmp_path):
    if shutil.which("redis-server") is None:
        peer_missing("redis-server is not installed (the broker restart test runs its own)")
    from lifeboat.celery import app

    s = Stack(tmp_path)
    s.start_redis()
    # This test process sends job messages too (on commit): to the test's broker.
    previous = app.conf.broker_url
    app.close()
    app.conf.broker_url = s.broker
    try:
        yield s
    finally:
        s.close()
        app.close()
        app.conf.broker_url = previous
        failed_logs = [p for p in tmp_path.glob("worker-*.log")]
        for p in failed_logs:  # the workers' logs, for a failure's report
            print(p.name, p.read_text(errors="replace")[-3000:])


def _site(n: int):
    vault = VaultFactory(passphrase=PASSPHRASE)
    policy = PolicyFactory(vault=vault)
    ps = ProcessServerFactory(vault=vault)
    machines = []
    for i in range(n):
        machine = MachineFactory(vault=vault, source="vcenter")  # a vCenter VM: its agent is installed by hand
        DiskFactory(machine=machine, key=2000)
        machines.append(machine)
    items, jobs = [], []
    for machine in machines:
        with transaction.atomic():
            item, job = protected_item_enable(vault=vault, machine=machine, policy=policy, process_server=ps)
        items.append(item)
        jobs.append(job)
    return vault, ps, items, jobs


def _register_agents(vault, items) -> None:
    client = APIClient()
    for item in items:
        machine = item.machine
        response = client.post("/api/v1/agents/register", {
            "passphrase": PASSPHRASE, "vault": vault.name, "hostname": machine.name,
            "machine": {"name": machine.name, "instance_uuid": machine.instance_uuid,
                        "disks": [{"key": 2000, "path": f"/dev/disk/{machine.name}", "capacity_bytes": 8 * 1024 * 1024}]},
        }, format="json")
        assert response.status_code == 201, response.content


def _finish_initial_copies(ps) -> bool:
    """Stand in for the apply engine finishing the initial copies that are under way; True
    once every enable job has ended."""
    for item in ProtectedItem.objects.filter(protection_state=P.INITIAL_REPLICATION):
        protected_item_transition(item_id=item.pk, to_state=P.PROTECTED, operation="finish initial replication",
                                  initial_replication_progress=100)
        job_wake(initial_slot_wait_key(ps.pk))
        job_wake(item_wait_key(item.pk))
    return not Job.objects.filter(type=JobType.ENABLE_REPLICATION, state__in=JobState.ACTIVE).exists()


def _all_waiting_for_agents(jobs) -> bool:
    waiting = Job.objects.filter(pk__in=[j.pk for j in jobs], state=JobState.WAITING,
                                 waiting_for__startswith="Waiting for the mobility agent to register")
    return waiting.count() == len(jobs)


def test_twenty_waiting_enables_on_a_two_process_worker_leave_it_free(stack):
    stack.start_worker()
    stack.start_beat()
    vault, ps, items, jobs = _site(JOBS)
    wait_for(lambda: _all_waiting_for_agents(jobs), timeout=180, message="20 enable jobs waiting for their agents")
    steps = Job.objects.get(pk=jobs[0].pk).steps
    assert [s["state"] for s in steps] == ["SUCCEEDED", "WAITING", "PENDING", "PENDING", "PENDING"]

    # Meanwhile the two worker processes still take new jobs, apply passes and monitoring.
    others = [ProtectedItemFactory(vault=vault, process_server=ps) for _ in range(3)]
    disables = []
    for item in others:
        ProtectedItem.objects.filter(pk=item.pk).update(protection_state=P.PROTECTED)
        with transaction.atomic():
            disables.append(protected_item_disable(item=ProtectedItem.objects.get(pk=item.pk))[1])
    for job in disables:
        done = wait_for(lambda: Job.objects.filter(pk=job.pk, state__in=JobState.TERMINAL).first(), timeout=120,
                        message="a disable job started while 20 jobs wait")
        assert done.state == JobState.SUCCEEDED, done.error
    canary = ProtectedItemFactory(vault=vault, process_server=ps)
    ProtectedItem.objects.filter(pk=canary.pk).update(protection_state=P.PROTECTED, apply_lease_owner="stale")
    from lifeboat.celery import app

    app.send_task("replication.apply_item", args=[str(canary.pk)], queue="apply")
    wait_for(lambda: ProtectedItem.objects.get(pk=canary.pk).apply_lease_owner == "", timeout=120,
             message="an apply pass to run (it takes and gives back the item's lease)")
    ProcessServer.objects.filter(pk=ps.pk).update(cpu_percent=99)
    app.send_task("replication.monitor", queue="maintenance")
    wait_for(lambda: Alert.objects.filter(key=f"ps:{ps.pk}", message__contains="CPU use is 99%").exists(), timeout=120,
             message="monitoring to run")
    assert _all_waiting_for_agents(jobs)  # nobody was let through

    # The agents register (the event): every job goes on and ends once its copy is done.
    _register_agents(vault, items)
    wait_for(lambda: _finish_initial_copies(ps), timeout=300, interval=0.5, message="every enable job to end")
    for job in Job.objects.filter(pk__in=[j.pk for j in jobs]):
        assert job.state == JobState.SUCCEEDED, job.error
        assert [s["state"] for s in job.steps] == ["SUCCEEDED"] * 5
        messages = [s.get("message", "") for s in job.steps]
        assert messages[1].startswith(f"The agent on {job.target_name} registered with 1 disk")
        assert messages[3].startswith("Initial copy complete:"), messages
        assert "% copied" not in " ".join(messages)
    assert ProtectedItem.objects.filter(pk__in=[i.pk for i in items], protection_state=P.PROTECTED).count() == JOBS


def test_killing_worker_broker_and_beat_mid_jobs_loses_no_job(stack):
    stack.start_worker()
    stack.start_beat()
    vault, ps, items, jobs = _site(JOBS)
    # Mid-jobs: some ran and wait, others are queued or running in the worker.
    wait_for(lambda: Job.objects.filter(pk__in=[j.pk for j in jobs], state=JobState.WAITING).exists(), timeout=180,
             message="the first enable job to wait")
    stack.kill("worker")
    stack.kill("beat")
    stack.kill("redis")  # without persistence: every message it held is gone
    stack.start_redis()
    stack.start_beat()
    stack.start_worker()
    assert stack.queue_len("data") == 0
    # Jobs whose message was lost are sent again by the reaper; running ones the killed
    # worker held are failed by it with a sentence.
    wait_for(lambda: not Job.objects.filter(pk__in=[j.pk for j in jobs], state__in=[JobState.QUEUED, JobState.RUNNING]).exists(),
             timeout=240, interval=0.5, message="no enable job left queued or running after the restarts")
    _register_agents(vault, items)
    # Once more in the middle of the copies: the worker is killed and another one started.
    wait_for(lambda: ProtectedItem.objects.filter(protection_state=P.INITIAL_REPLICATION).exists(), timeout=180,
             message="initial copies under way")
    stack.kill("worker")
    stack.start_worker()
    wait_for(lambda: _finish_initial_copies(ps), timeout=400, interval=0.5, message="every enable job to end")
    states = {}
    for job in Job.objects.filter(pk__in=[j.pk for j in jobs]):
        states[job.state] = states.get(job.state, 0) + 1
        assert job.state in (JobState.SUCCEEDED, JobState.FAILED), job.state
        if job.state == JobState.FAILED:
            assert job.error.strip().endswith("."), job.error
            assert ("stopped reporting" in job.error or "No worker took this job" in job.error), job.error
    assert sum(states.values()) == JOBS
    assert states.get(JobState.SUCCEEDED, 0) > 0, states
    # A failed enable leaves its item where the portal offers a way on (retry or disable).
    for item in ProtectedItem.objects.filter(pk__in=[i.pk for i in items]):
        assert item.protection_state in (P.PROTECTED, P.ENABLE_FAILED), item.protection_state
