"""Recovery plan RTO benchmark: a test failover of a plan of 100 small VMs in 3 groups, with
one script action per group, then its cleanup, on the simulated recovery site.

Everything Lifeboat runs is real: PostgreSQL, Redis, Celery workers as docker-compose.yml
runs them (one for the control and data queues, one for apply, one for maintenance, each
its own processes), the API (called in this process through Django's test client), the
enable jobs, the apply engine, the plan job and its item jobs, the script runner and the
simulated recovery site. The beat's sweeps are sent from a thread here at the production
cadence (lifeboat/schedules.py: apply every 5 s, job wake-ups every 3 s; faster during setup).

Setup (not timed): a simulated VMware site with ``--vms`` VMs of two ``--disk-mib`` disks,
filled with random bytes; each VM is protected through the API (the real enable job); its
initial copy is shipped as the process server stores it (sealed replication logs in target
storage, one per disk, the last one marking the copy done), and the real apply engine
writes the replicas and cuts each VM's first point. Shipping the logs from here instead of
running 100 agents and a process server keeps setup to a minute; it changes nothing of what
a failover does.

Timed:

* the plan's test failover, from the API call until the plan job ends SUCCEEDED (every test
  VM built from its replica snapshot, read back and verified, powered on), with each
  group's time (its item jobs, then its script) from the plan job's steps;
* its cleanup the same way;
* a baseline in the same run: a plain copy of the same replica bytes (read + write + fsync
  into one file per disk, like ``cp``), with as many copies at once as the control worker
  runs jobs. The replica is dropped from the page cache before the failover and before the
  baseline, so both read it from the device.

``--rounds`` (default 3) rounds of baseline, test failover and cleanup; the median round (by
overhead) is reported, with every round's figures, as the machine's load moves them.

Lifeboat's own overhead per VM = (plan time - baseline copy time - script time) / VMs: what
the plan costs beyond copying the bytes and running the plan's own scripts (the job engine,
queueing, database, the recovery site's bookkeeping, verification reads). Every test VM's
disks are compared with the source byte for byte after the first failover.

    python bench/bench_plan_rto.py [--vms 100] [--disk-mib 4] [--groups 3] [--rounds 3]
                                   [--workdir DIR] [--keep] [--profile DIR]

DATABASE_URL (default postgres://postgres@127.0.0.1:5432/lifeboat_planbench, dropped and
created again) and CELERY_BROKER_URL (default redis://127.0.0.1:6379/11, purged) name the
servers it uses.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_rto import baseline_copy, drop_cache  # noqa: E402
from benchdoc import replace_section  # noqa: E402

MiB = 1024 * 1024
TARGET_PLAN_S = 60.0
TARGET_OVERHEAD_MS = 100.0
CONTROL_CONCURRENCY = 4  # the control/data worker's processes, as in docker-compose.yml
PLANS = "/api/v1/replicationRecoveryPlans"
ITEMS = "/api/v1/replicationProtectedItems"
SCRIPT = 'echo "group $LIFEBOAT_GROUP of $LIFEBOAT_PLAN is up"'


def _fresh_database(url: str) -> None:
    from urllib.parse import urlparse

    import psycopg2

    u = urlparse(url)
    name = u.path.lstrip("/")
    try:
        conn = psycopg2.connect(u._replace(path="/postgres").geturl())
    except psycopg2.OperationalError as exc:
        raise SystemExit(f"The benchmark needs PostgreSQL and Redis (make peers); {url} is not reachable: {exc}")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


class Workers:
    """The Celery workers, as docker-compose.yml runs them, each its own process tree."""

    GROUPS = (("jobs", "control,data", CONTROL_CONCURRENCY), ("apply", "apply", 4), ("maintenance", "maintenance", 2))

    def __init__(self, workdir: str, env: dict, profile_dir: str | None = None) -> None:
        self.procs = []
        for name, queues, concurrency in self.GROUPS:
            log = open(os.path.join(workdir, f"worker-{name}.log"), "ab")
            app, proc_env = "lifeboat", env
            if profile_dir and name == "jobs":  # the worker that runs the plan and item jobs, under cProfile
                app = "planbench_worker"
                proc_env = {**env, "LIFEBOAT_BENCH_PROFILE_DIR": profile_dir,
                            "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "bench"), ROOT])}
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queues, "-c", str(concurrency),
                 "-n", f"{name}-planbench@%h", "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
                cwd=ROOT, env=proc_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


class Beat:
    """What celery beat sends: the apply sweep and the job wake-ups, every few seconds."""

    def __init__(self, apply_every: float, wake_every: float) -> None:
        self.apply_every, self.wake_every = apply_every, wake_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="beat")
        self._thread.start()

    def _run(self) -> None:
        from core.tasks import wake_jobs
        from replication.tasks import apply_sweep

        next_apply = next_wake = 0.0
        while not self._stop.wait(0.2):
            now = time.monotonic()
            if now >= next_apply:
                apply_sweep.delay()
                next_apply = now + self.apply_every
            if now >= next_wake:
                wake_jobs.delay()
                next_wake = now + self.wake_every

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(4 * MiB), b""):
            h.update(piece)
    return h.hexdigest()


def _ship_initial_copy(item, seal_key: bytes, storage, source_site) -> dict[int, str]:
    """The item's initial copy as the process server stores it: one sealed log per disk, the
    last marking the copy done. Returns each disk's SHA-256."""
    from replication.dataplane import batch as wire
    from replication.dataplane.sealing import seal

    shas = {}
    disks = sorted(item.replica_disks.all(), key=lambda d: d.index)
    for n, disk in enumerate(disks, start=1):
        path = source_site.disk_path(item.machine.instance_uuid, disk.source_disk_key)
        with open(path, "rb") as f:
            data = f.read()
        shas[disk.index] = hashlib.sha256(data).hexdigest()
        flags = wire.FLAG_INITIAL | (wire.FLAG_INITIAL_DONE if n == len(disks) else 0)
        raw = wire.encode(item_id=item.pk, seq=n, source_time_ns=time.time_ns(),
                          records=[wire.Record(wire.KIND_WRITE, disk.index, 0, data)], flags=flags)
        storage.put_object(f"logs/{item.pk}/{n:020d}.lbs", seal(raw, key=seal_key, context=f"{item.pk}:{n}".encode()))
    return shas


def setup(workdir: str, *, vms: int, disk_bytes: int, groups: int) -> dict:
    from django.contrib.auth import get_user_model
    from rest_framework.test import APIClient

    from core.choices import JobState
    from core.models import Job
    from replication.choices import ProtectionState as P
    from replication.engine import storage
    from replication.models import ProtectedItem, RecoveryPoint
    from vault import services
    from vault.connectors.simulated import SimulatedSite
    from vault.discovery import connector_for, machines_upsert

    t = time.perf_counter()
    site_dir = os.path.join(workdir, "source-site")
    names = [f"vm{n:03d}" for n in range(vms)]
    SimulatedSite.create(site_dir, user="sim-admin", password="sim-password-1",
                         vms=[{"name": n, "disks": [disk_bytes, disk_bytes]} for n in names])
    source = SimulatedSite(site_dir, "sim-admin", "sim-password-1")
    source.connect()
    vault = services.vault_create(name="bench", passphrase="bench-passphrase-long-enough")
    policy = services.policy_create(vault=vault, name="bench", crash_consistent_frequency_seconds=300,
                                    app_consistent_frequency_hours=0)
    server = services.process_server_create(vault=vault, name="ps-bench", host="127.0.0.1")
    vcenter = services.vcenter_create(vault=vault, name="sim", kind="simulated", host=site_dir,
                                      username="sim-admin", password="sim-password-1")
    with connector_for(vcenter) as conn:
        machines_upsert(vcenter=vcenter, vms=conn.discover().vms)
    recovery = services.recovery_site_create(vault=vault, name="recovery-site", host=os.path.join(workdir, "recovery"),
                                             networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")])
    # The source disks hold data (random: no two blocks alike).
    for vm in source.discover().vms:
        for d in vm.disks:
            with open(source.disk_path(vm.instance_uuid, d.key), "r+b") as f:
                f.write(os.urandom(d.capacity_bytes))

    admin = get_user_model().objects.create_superuser("bench-admin", "admin@example.com", "bench-password-1")
    api = APIClient()
    api.force_authenticate(admin)
    jobs = []
    for machine in vault.machines.order_by("name"):
        r = api.post(f"{ITEMS}/", {"vault": vault.pk, "machine": machine.pk, "policy": policy.pk,
                                   "process_server": server.pk, "recovery_site": recovery.pk}, format="json")
        assert r.status_code == 202, r.content
        jobs.append(r.data["id"])
    seal_key, _ = services.vault_keys(vault=vault)
    shas: dict[str, dict[int, str]] = {}
    shipped: set = set()

    def ship_ready() -> bool:
        ready = ProtectedItem.objects.filter(vault=vault, protection_state=P.INITIAL_REPLICATION) \
            .exclude(pk__in=shipped).select_related("machine").prefetch_related("replica_disks")
        for item in ready:
            if item.replica_disks.count() == 2:
                shas[str(item.pk)] = _ship_initial_copy(item, seal_key, storage(), source)
                shipped.add(item.pk)
        return len(shipped) == vms

    _wait(ship_ready, 600, "every item in initial replication")
    _wait(lambda: Job.objects.filter(pk__in=jobs, state__in=JobState.TERMINAL).count() == vms, 600,
          "every enable job to end", interval=0.5)
    failed = Job.objects.filter(pk__in=jobs).exclude(state=JobState.SUCCEEDED).first()
    assert failed is None, f"enable of {failed.target_name} ended {failed.state}: {failed.error}"
    items = list(ProtectedItem.objects.filter(vault=vault).order_by("name"))
    assert all(i.protection_state == P.PROTECTED for i in items)
    _wait(lambda: RecoveryPoint.objects.filter(item__vault=vault).values("item").distinct().count() == vms, 120,
          "a recovery point of every item")

    size = -(-vms // groups)
    body = {"vault": vault.pk, "name": "bench-plan", "recovery_point_type": "latest", "groups": [
        {"name": f"Tier {g + 1}", "items": [str(i.pk) for i in items[g * size:(g + 1) * size]],
         "actions": [{"phase": "POST", "kind": "SCRIPT", "name": f"Script {g + 1}", "timeout_seconds": 60,
                      "script": SCRIPT}]}
        for g in range(groups)
    ]}
    r = api.post(f"{PLANS}/", body, format="json")
    assert r.status_code == 201, r.content
    return {"api": api, "plan": r.data["id"], "items": items, "shas": shas, "recovery": recovery,
            "setup_s": time.perf_counter() - t}


def _replica_names(items) -> list[str]:
    return [d.storage_name for item in items for d in item.replica_disks.all()]


def baseline(workdir: str, items) -> tuple[float, int]:
    from replication.engine import storage

    store = storage()
    names = _replica_names(items)
    drop_cache(store, names)
    out = os.path.join(workdir, "baseline")
    os.makedirs(out)
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CONTROL_CONCURRENCY) as pool:
        copied = sum(pool.map(lambda n: baseline_copy(store, n, os.path.join(out, n + ".img")), names))
    seconds = time.perf_counter() - t
    shutil.rmtree(out)
    return seconds, copied


def _ts(value: str) -> float:
    return datetime.datetime.fromisoformat(value).timestamp()


def timed_run(api, plan_id, action: str, body: dict) -> dict:
    """One plan operation through the API, until its job ends; its steps' times."""
    from core.choices import JobState
    from core.models import Job

    t = time.perf_counter()
    r = api.post(f"{PLANS}/{plan_id}/{action}", body, format="json")
    assert r.status_code == 202, r.content
    job = _wait(lambda: Job.objects.filter(pk=r.data["id"], state__in=JobState.TERMINAL).first(), 1200,
                f"the plan job of {action}", interval=0.05)
    seconds = time.perf_counter() - t
    assert job.state == JobState.SUCCEEDED, f"{action} ended {job.state}: {job.error}"
    steps = [{"name": s["name"], "seconds": round(_ts(s["ended_at"]) - _ts(s["started_at"]), 3),
              **({"script_s": s["script"]["seconds"]} if s.get("script") else {})} for s in job.steps]
    children = list(Job.objects.filter(parent=job))
    runs = [(c.ended_at - c.started_at).total_seconds() for c in children if c.started_at and c.ended_at]
    queued = [(c.started_at - c.created_at).total_seconds() for c in children if c.started_at]
    for st, raw in zip(steps, job.steps):  # how long the plan job took to start the group's item jobs
        began, ended = _ts(raw["started_at"]), _ts(raw["ended_at"])
        made = [c.created_at.timestamp() for c in children if began <= c.created_at.timestamp() <= ended]
        if made:
            st["item_jobs_started_within_s"] = round(max(made) - began, 3)
    item_steps: dict[str, list[float]] = {"(job start, before its first step)": []}
    for c in children:
        timed = [x for x in c.steps if x.get("started_at") and x.get("ended_at")]
        if timed and c.started_at:
            item_steps["(job start, before its first step)"].append(_ts(timed[0]["started_at"]) - c.started_at.timestamp())
        for x in timed:
            item_steps.setdefault(x["name"], []).append(_ts(x["ended_at"]) - _ts(x["started_at"]))
    return {"seconds": round(seconds, 3), "steps": steps, "item_jobs": len(children),
            "item_job_steps_mean_s": {k: round(sum(v) / len(v), 3) for k, v in item_steps.items() if v},
            "item_job_run_s_mean": round(sum(runs) / len(runs), 3) if runs else None,
            "item_job_run_s_max": round(max(runs), 3) if runs else None,
            "item_job_queue_s_max": round(max(queued), 3) if queued else None}


def verify(items, shas) -> int:
    """Every test VM's disks, byte for byte (SHA-256), against the source's."""
    from recovery_plans.models import RecoveredVm

    checked = 0
    for item in items:
        vm = RecoveredVm.objects.get(item=item, kind="TEST", removed_at__isnull=True)
        with vm.site.connector() as connector:
            for disk in connector.get_vm(vm.vm_id).disks:
                h = hashlib.sha256()
                for piece in connector.read_disk(vm.vm_id, disk.index):
                    h.update(piece)
                assert h.hexdigest() == shas[str(item.pk)][disk.index], f"{vm.name} disk {disk.index} differs"
                checked += 1
    return checked


def _merge_profiles(directory: str) -> None:
    import pstats

    files = [os.path.join(directory, f) for f in os.listdir(directory) if f.startswith("worker-") and f.endswith(".prof")]
    if not files:
        return
    stats = pstats.Stats(*files, stream=open(os.path.join(directory, "top.txt"), "w"))
    stats.dump_stats(os.path.join(directory, "jobs-worker.prof"))
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--disk-mib", type=int, default=4, help="size of each of a VM's two disks")
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3,
                        help="test failover + cleanup rounds, each with its own baseline; the median round is reported")
    parser.add_argument("--workdir", default=None, help="where the sites and storage go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (worker logs)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="run the jobs worker's tasks under cProfile; write the merged profile and its top "
                             "functions into DIR (the figures then include the profiler's cost)")
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"),
                        help="page whose plan RTO section is replaced with the results ('' to leave it)")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="lifeboat-plan-rto-", dir=args.workdir)
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/lifeboat_planbench")
    env.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/11")
    env.update(DJANGO_SETTINGS_MODULE="lifeboat.settings", LIFEBOAT_DATA_DIR=os.path.join(workdir, "var"),
               LIFEBOAT_MAX_CONCURRENT_INITIAL=str(args.vms), LOG_LEVEL=env.get("LOG_LEVEL", "WARNING"))
    os.environ.update(env)
    _fresh_database(env["DATABASE_URL"])

    import django

    django.setup()
    from django.core.management import call_command

    from core.queues import ALL
    from lifeboat.celery import app

    call_command("migrate", verbosity=0)
    with app.connection_for_write() as conn:
        for queue in ALL:
            try:
                conn.default_channel.queue_purge(queue)
            except Exception:  # noqa: BLE001 - a queue that does not exist yet has nothing to purge
                pass
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    workers = Workers(workdir, env, profile_dir=args.profile)
    beat = Beat(apply_every=1.0, wake_every=1.0)  # setup only: faster than production
    report: dict = {
        "benchmark": "plan_rto",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": round(os.getloadavg()[0], 2)},
    }
    try:
        s = setup(workdir, vms=args.vms, disk_bytes=args.disk_mib * MiB, groups=args.groups)
        beat.close()
        beat = Beat(apply_every=5.0, wake_every=3.0)  # lifeboat/schedules.py
        from replication.engine import storage

        time.sleep(6)  # the last setup sweeps are done
        vms = args.vms
        total_bytes = vms * 2 * args.disk_mib * MiB
        rounds = []
        checked = 0
        for n in range(args.rounds):
            base_s, copied = baseline(workdir, s["items"])
            assert copied == total_bytes, (copied, total_bytes)
            drop_cache(storage(), _replica_names(s["items"]))
            failover = timed_run(s["api"], s["plan"], "testFailover", {})
            if n == 0:
                checked = verify(s["items"], s["shas"])
            cleanup = timed_run(s["api"], s["plan"], "testFailoverCleanup", {"comments": "Benchmark drill."})
            # the script stages' whole time (the scripts' own run time, rounded to 10 ms, is inside it)
            script_s = sum(st["seconds"] for st in failover["steps"] if "script_s" in st)
            rounds.append({"failover": failover, "cleanup": cleanup, "baseline_s": round(base_s, 3),
                           "scripts_s": round(script_s, 3),
                           "overhead_per_vm_ms": round((failover["seconds"] - base_s - script_s) / vms * 1000, 1)})
        mid = sorted(rounds, key=lambda r: r["overhead_per_vm_ms"])[len(rounds) // 2]  # the median round
        overhead_ms = mid["overhead_per_vm_ms"]
        failover, cleanup = mid["failover"], mid["cleanup"]
        report.update({
            "vms": vms, "groups": args.groups, "disks_per_vm": 2, "disk_mib": args.disk_mib,
            "total_mib": total_bytes // MiB, "control_worker_processes": CONTROL_CONCURRENCY,
            "rounds": len(rounds),
            "test_failover_s": failover["seconds"], "cleanup_s": cleanup["seconds"],
            "baseline_plain_copy_s": mid["baseline_s"], "scripts_s": mid["scripts_s"],
            "overhead_per_vm_ms": overhead_ms,
            "target_plan_s": TARGET_PLAN_S,
            "plan_meets_target": max(r["failover"]["seconds"] for r in rounds) <= TARGET_PLAN_S,
            "target_overhead_ms": TARGET_OVERHEAD_MS, "overhead_meets_target": overhead_ms <= TARGET_OVERHEAD_MS,
            "disks_verified_byte_for_byte": checked,
            "every_round": [{"test_failover_s": r["failover"]["seconds"], "cleanup_s": r["cleanup"]["seconds"],
                             "baseline_plain_copy_s": r["baseline_s"], "overhead_per_vm_ms": r["overhead_per_vm_ms"]}
                            for r in rounds],
            "failover": failover, "cleanup": cleanup, "setup_s": round(s["setup_s"], 1),
        })
    finally:
        beat.close()
        workers.close()
        if args.profile:
            _merge_profiles(args.profile)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if args.doc:
        write_doc(args.doc, report)
    return 0


SECTION = "## Recovery plan RTO"


def _groups_text(run: dict) -> str:
    out = []
    for st in run["steps"]:
        extra = f" (script {st['script_s']:.2f} s)" if "script_s" in st else ""
        if "item_jobs_started_within_s" in st:
            extra += f" (its item jobs all started within {st['item_jobs_started_within_s']:.1f} s)"
        out.append(f"{st['name']}: {st['seconds']:.1f} s{extra}")
    return "; ".join(out)


def write_doc(path: str, r: dict) -> None:
    """Replace (or add) the plan RTO section of the benchmarks page."""
    lines = [
        SECTION,
        "",
        f"Written by `python bench/bench_plan_rto.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC ({r['machine']['cpus']} CPUs, {r['machine']['platform']}; load average "
        f"{r['machine']['load_average_at_start']:.2f} before the run, {os.getloadavg()[0]:.2f} at its end). A recovery plan of {r['vms']} VMs (two disks of {r['disk_mib']} MiB each, "
        f"{r['total_mib']} MiB in all) in {r['groups']} groups, one script action after each group, test failover "
        "then cleanup on the simulated recovery site, through the API with real Celery workers (control/data worker "
        f"with {r['control_worker_processes']} processes, as docker-compose.yml) on PostgreSQL and Redis. The "
        "failover's time runs from the API call until the plan job ends SUCCEEDED: every test VM built from its "
        "replica snapshot (cold: the replica is read from the device), read back and verified, powered on. Every "
        "test VM's disks were then compared with the source byte for byte "
        f"({r['disks_verified_byte_for_byte']} disks). Baseline: a plain cold copy of the same replica bytes "
        f"(read + write + fsync, {r['control_worker_processes']} at once), measured in the same run.",
        "",
        f"{r['rounds']} rounds, each a baseline copy, the test failover and its cleanup; the table shows the median "
        "round (by overhead per VM), the line under it every round. The whole plan's target holds when every round "
        "meets it.",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| test failover of the whole plan | {r['test_failover_s']:.1f} s | <= {r['target_plan_s']:.0f} s, every round "
        f"({'met' if r['plan_meets_target'] else 'not met'}) |",
        f"| cleanup of the whole plan | {r['cleanup_s']:.1f} s | |",
        f"| baseline: plain copy of the same {r['total_mib']} MiB | {r['baseline_plain_copy_s']:.1f} s | |",
        f"| the plan's scripts | {r['scripts_s']:.2f} s | |",
        f"| Lifeboat's overhead per VM | {r['overhead_per_vm_ms']:.0f} ms | <= {r['target_overhead_ms']:.0f} ms "
        f"({'met' if r['overhead_meets_target'] else 'not met'}) |",
        "",
        "Every round (test failover / cleanup / baseline / overhead per VM): "
        + "; ".join(f"{x['test_failover_s']:.1f} s / {x['cleanup_s']:.1f} s / {x['baseline_plain_copy_s']:.1f} s / "
                    f"{x['overhead_per_vm_ms']:.0f} ms" for x in r["every_round"]) + ".",
        "",
        "Overhead per VM = (test failover time - baseline copy time - scripts' time) / VMs: what the plan costs "
        "beyond copying the bytes and running its scripts (job engine, queueing, database, the recovery site's "
        "bookkeeping, the verification read-back).",
        "",
        f"Per stage of the test failover (from the plan job's steps): {_groups_text(r['failover'])}. An item job "
        f"ran {r['failover']['item_job_run_s_mean']:.2f} s on average (longest {r['failover']['item_job_run_s_max']:.2f} s)"
        f". Per stage of the cleanup: {_groups_text(r['cleanup'])}.",
        "",
        f"Where an item job's time goes (mean over the {r['failover']['item_jobs']} test failover jobs, "
        f"{r['control_worker_processes']} at once on {r['machine']['cpus']} CPUs): "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["failover"]["item_job_steps_mean_s"].items())
        + ". Preparing the point reads each replica snapshot for its digest; creating the test VM copies it and "
        "reads the copy back to verify it: three passes over the bytes, where the baseline makes one.",
        "",
        "What the overhead is made of (profiled with `--profile DIR`, cProfile in the jobs worker): per VM, the "
        "plan job starts the item's job through the item's own service (about 13 queries) and the item job makes "
        "about 35 more (state transitions, step and progress writes, a cancel check at each step); Celery closes "
        "the database connection after every task, so each item job and each wake-up of the plan job opens a new "
        "one; and the simulated recovery site keeps its whole inventory in one JSON file, rewritten under one "
        "exclusive lock at each VM created, powered on or off, or removed, so its cost per VM grows with the "
        "number of VMs on the site. With 4 item jobs at once on 2 CPUs the work is bound by the CPUs: the figures "
        "move with the machine's load.",
        "",
    ]
    replace_section(path, SECTION, lines)


if __name__ == "__main__":
    raise SystemExit(main())
