"""Failback benchmark: the whole cycle on one VM with 1 GiB of disks, of which 1 % was
written in the recovery site, on real parts.

Everything runs as in production, each its own process: the API/portal (gunicorn, which the
agents and the process servers talk to), the Celery workers as docker-compose.yml runs them,
celery beat on Lifeboat's own schedule, one process server on each side (the forward one,
and the recovery site's that the returning replication sends to), and the mobility agents of
both simulated sites (``python -m replication.agent_host``, as ``make run`` runs them, with
its intervals). This process calls the API (through Django's test client) and watches.
Each process server sits behind a TCP relay that counts every byte between the agents and
it, both ways, TLS included.

Setup: a simulated VMware site with one VM, disks of 768 and 256 MiB, filled with data
before it is protected (every other MiB random, the rest a repeated text record with the
MiB's number, so no two MiB are alike and nothing is zero); protection through the API
(the agent's real initial copy), planned failover to the simulated recovery site, commit.
Then the recovered VM writes exactly 1 % of its 4 KiB blocks, at places spread over both
disks (a seeded choice) with random bytes, through the write filter, as a guest's writes go
(journaled); it is idle otherwise, as is the on-premises VM.

Timed, each from the API call until its job ends SUCCEEDED (the page cache is dropped before
each but the commit, which reads no disk):

* reProtect to the original location: the returning replica is seeded from the original
  VM's disks on-premises, the recovered VM's agent compares its disks with the replica's
  checksums and sends only the blocks that differ;
* plannedFailover to on-premises (the failback), then failoverCommit;
* reProtect again (re-enable): the on-premises VM, which now differs from the forward
  replica by the same 1 %, is compared with it and only what differs is sent.

For reprotect and re-enable: the disk data sent (the failback row's ``figures``, from the
agent's pass), the bytes on the wire each way, and the checksum traffic. Nothing counts the
digests the agent fetches, so that figure is computed from what the pass fetches
(``mobility.checksum_pass``): every disk's 64 KiB group digests (16 bytes a group) and, for
each group whose digest differs, its 16 block digests (16 bytes each); the relay's bytes from
the process server (digests, acknowledgements, HTTP and TLS) bound it from above. Target
(the issue's): the data sent by each is at most twice the changed data plus the checksum
traffic.

Baselines in the same run: a plain cold copy of the VM's 1 GiB (read + write + fsync, as
``cp``), and Lifeboat's own full copy of it, the VM's initial replication (what reprotect to
an alternate location sends).

Every landing is compared byte for byte: the recovered VM with the on-premises disks after
the failover, the on-premises disks with the recovered VM (its writes included) after the
failback, the forward replica with the on-premises disks after re-enabling.

    python bench/bench_failback.py [--disk-mib 768 256] [--changed 0.01] [--workdir DIR] [--keep]

DATABASE_URL (default postgres://postgres@127.0.0.1:5432/lifeboat_failbackbench, dropped and
created again) and CELERY_BROKER_URL (default redis://127.0.0.1:6379/12, purged) name the
servers it uses.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_plan_rto import Workers, _fresh_database, _wait  # noqa: E402
from bench_resync import CountingRelay, evict, quiesce  # noqa: E402
from benchdoc import replace_section  # noqa: E402
from mobility.checksums import FINE_BYTES, FINE_DIGEST_BYTES, GROUP_BLOCKS, GROUP_BYTES  # noqa: E402

MiB = 1024 * 1024
ITEMS = "/api/v1/replicationProtectedItems"
JOB_TIMEOUT = 1200


class Service:
    """One of Lifeboat's own processes (its own process group, its output in a log file)."""

    def __init__(self, name: str, argv: list[str], workdir: str, env: dict) -> None:
        self.name = name
        log = open(os.path.join(workdir, f"{name}.log"), "ab")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _web(workdir: str, env: dict, port: int) -> Service:
    web = Service("web", [sys.executable, "-m", "gunicorn", "lifeboat.wsgi", "-b", f"127.0.0.1:{port}", "-w", "2",
                          "--threads", "4"], workdir, env)

    def answers() -> bool:
        if web.proc.poll() is not None:
            raise SystemExit(f"the web server exited; see {workdir}/web.log")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/", timeout=2)
        except urllib.error.HTTPError:
            return True  # it answers (a refusal without credentials is an answer)
        except OSError:
            return False
        return True

    _wait(answers, 60, "the web server")
    return web


def _sha(path: str, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size if size is not None else os.fstat(f.fileno()).st_size
        while left > 0:
            piece = f.read(min(4 * MiB, left))
            if not piece:
                piece = bytes(min(4 * MiB, left))  # a sparse tail reads as zeros
            h.update(piece)
            left -= len(piece)
    return h.hexdigest()


def fill(path: str, size: int, seed: int) -> None:
    """Every other MiB random, the others a repeated text record naming the MiB: real data
    to seed and compare (no zero runs to skip), no two MiB alike, quick to write."""
    with open(path, "r+b") as f:
        for n in range(size // MiB):
            if n % 2:
                line = b"lifeboat failback bench record seed=%04d mib=%08d status=ok\n" % (seed, n)
                f.write((line * (MiB // len(line) + 1))[:MiB])
            else:
                f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())


def plain_copy(sources: list[str], out_dir: str) -> int:
    """Read each file and write it into ``out_dir`` with an fsync: what ``cp`` does."""
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    total = 0
    for n, src in enumerate(sources):
        with open(src, "rb", buffering=0) as fin, open(os.path.join(out_dir, f"{n}.img"), "wb", buffering=0) as fout:
            while got := fin.readinto(buf):
                fout.write(view[:got])
                total += got
            os.fsync(fout.fileno())
    return total


def write_changes(site, vm_uuid: str, share: float, seed: int) -> dict:
    """The recovered VM's writes: ``share`` of each disk's 4 KiB blocks, chosen at random
    (seeded), each written once with random bytes through the write filter (journaled, as
    the simulated guest's writes are). Returns what changed."""
    from mobility.filter import WriteFilter

    rng = random.Random(seed)
    vm = site.read_state()["vms"][vm_uuid]
    blocks = groups = 0
    group_digest_bytes = 0
    for disk in vm["disks"]:
        capacity = disk["capacity_bytes"]
        count = capacity // FINE_BYTES
        chosen = sorted(rng.sample(range(count), round(count * share)))
        flt = WriteFilter(site.disk_path(vm_uuid, disk["key"]), site.journal_dir(vm_uuid, disk["key"]))
        try:
            for block in chosen:
                flt.write(block * FINE_BYTES, os.urandom(FINE_BYTES))
        finally:
            flt.close()
        blocks += len(chosen)
        groups += len({b // GROUP_BLOCKS for b in chosen})
        group_digest_bytes += -(-capacity // GROUP_BYTES) * FINE_DIGEST_BYTES
    block_digest_bytes = groups * GROUP_BLOCKS * FINE_DIGEST_BYTES
    return {"blocks": blocks, "bytes": blocks * FINE_BYTES, "groups": groups,
            "checksum_bytes": group_digest_bytes + block_digest_bytes,
            "group_digest_bytes": group_digest_bytes, "block_digest_bytes": block_digest_bytes}


class Wire:
    """Both relays' counters, read around each step."""

    def __init__(self, forward: CountingRelay, back: CountingRelay) -> None:
        self.relays = {"forward": forward, "back": back}

    def snapshot(self) -> dict:
        return {name: (r.up, r.down) for name, r in self.relays.items()}

    @staticmethod
    def delta(before: dict, after: dict) -> dict:
        return {name: {"to_process_server": after[name][0] - before[name][0],
                       "from_process_server": after[name][1] - before[name][1]} for name in before}


def _ts(value: str) -> float:
    return datetime.datetime.fromisoformat(value).timestamp()


def timed(api, wire: Wire, what: str, url: str, body: dict | None = None) -> dict:
    """One operation through the API, until its job ends SUCCEEDED: its time, its steps'
    times and the bytes on each relay meanwhile."""
    from core.choices import JobState
    from core.models import Job

    before = wire.snapshot()
    t = time.perf_counter()
    r = api.post(url, body or {}, format="json")
    if r.status_code != 202:
        raise SystemExit(f"{what}: the API answered {r.status_code}: {r.content[:500]!r}")
    job = _wait(lambda: Job.objects.filter(pk=r.data["id"], state__in=JobState.TERMINAL).first(), JOB_TIMEOUT,
                f"the {what} job", interval=0.05)
    seconds = time.perf_counter() - t
    if job.state != JobState.SUCCEEDED:
        raise SystemExit(f"{what} ended {job.state}: {job.error}")
    steps = [{"name": s["name"], "seconds": round(_ts(s["ended_at"]) - _ts(s["started_at"]), 3)}
             for s in job.steps if s.get("started_at") and s.get("ended_at")]
    return {"seconds": round(seconds, 3), "steps": steps, "wire": Wire.delta(before, wire.snapshot()),
            "result": job.result}


def _recovered_shas(vm) -> dict[int, str]:
    out = {}
    with vm.site.connector() as connector:
        for disk in connector.get_vm(vm.vm_id).disks:
            h = hashlib.sha256()
            for piece in connector.read_disk(vm.vm_id, disk.index):
                h.update(piece)
            out[disk.index] = h.hexdigest()
    return out


def _replica_shas(item) -> dict[int, str]:
    """The forward replica as it is now (every applied write), disk by disk."""
    from replication.engine import storage

    out = {}
    for disk in item.replica_disks.filter(removed_at__isnull=True):
        h = hashlib.sha256()
        for piece in storage().iter_disk(disk.storage_name):
            h.update(piece)
        out[disk.index] = h.hexdigest()
    return out


def run(workdir: str, env: dict, *, disk_mib: list[int], share: float) -> dict:
    from django.contrib.auth import get_user_model
    from rest_framework.test import APIClient

    from failback.models import Failback
    from recovery_plans.models import RecoveredVm
    from replication.models import ProtectedItem
    from vault import services
    from vault.connectors.recovery_sim import _LocalSite
    from vault.connectors.simulated import SimulatedSite
    from vault.discovery import connector_for, machines_upsert
    from vault.models import ProcessServer

    from replication.dataplane import process_server
    from replication.process_servers import process_server_config

    report: dict = {}
    site_dir, recovery_dir = os.path.join(workdir, "site"), os.path.join(workdir, "recovery")
    SimulatedSite.create(site_dir, user="sim-admin", password="sim-password-1",
                         vms=[{"name": "app-fb", "disks": [m * MiB for m in disk_mib]}])
    source = SimulatedSite(site_dir, "sim-admin", "sim-password-1")
    source.connect()
    t = time.perf_counter()
    vm_uuid = source.discover().vms[0].instance_uuid
    for n, d in enumerate(source.get_vm(vm_uuid).disks):
        fill(source.disk_path(vm_uuid, d.key), d.capacity_bytes, seed=n)
    report["fill_s"] = round(time.perf_counter() - t, 1)
    total = sum(m * MiB for m in disk_mib)

    vault = services.vault_create(name="bench", passphrase="bench-passphrase-long-enough")
    policy = services.policy_create(vault=vault, name="bench", app_consistent_frequency_hours=0)
    vcenter = services.vcenter_create(vault=vault, name="sim", kind="simulated", host=site_dir,
                                      username="sim-admin", password="sim-password-1")
    with connector_for(vcenter) as conn:
        machines_upsert(vcenter=vcenter, vms=conn.discover().vms)
    recovery = services.recovery_site_create(vault=vault, name="recovery-site", host=recovery_dir,
                                             networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")])
    services.master_target_server_create(vault=vault, name="mt-01", host="127.0.0.1")

    # A process server on each side, each behind a relay that counts its bytes: the agents
    # are given the relay's port.
    relays, servers = {}, {}
    for side, name in (("PRIMARY", "ps-forward"), ("RECOVERY", "ps-recovery")):
        row = services.process_server_create(vault=vault, name=name, host="127.0.0.1", site=side)
        config = process_server_config(server=row, cache_dir=os.path.join(workdir, f"{name}-cache"))
        config["listen"] = "127.0.0.1:0"
        servers[side] = process_server.spawn(config, config_path=os.path.join(workdir, f"{name}.json"),
                                             log_path=os.path.join(workdir, f"{name}.log"), ready_timeout=60)
        relays[side] = CountingRelay(servers[side].port)
        ProcessServer.objects.filter(pk=row.pk).update(data_port=relays[side].port)
    ps_forward = ProcessServer.objects.get(name="ps-forward")
    wire = Wire(relays["PRIMARY"], relays["RECOVERY"])
    os.makedirs(recovery_dir, exist_ok=True)
    agents = [Service(f"agents-{name}", [sys.executable, "-m", "replication.agent_host", "--site-dir", where,
                                         "--log-level", "WARNING"], workdir, env)
              for name, where in (("site", site_dir), ("recovery", recovery_dir))]
    try:
        admin = get_user_model().objects.create_superuser("bench-admin", "admin@example.com", "bench-password-1")
        api = APIClient()
        api.force_authenticate(admin)
        machine = vault.machines.get()

        # --- protect (the initial copy: Lifeboat's own full copy of the 1 GiB), fail over, commit.
        protect = timed(api, wire, "protect", f"{ITEMS}/", {
            "vault": vault.pk, "machine": machine.pk, "policy": policy.pk, "process_server": ps_forward.pk,
            "recovery_site": recovery.pk})
        item = ProtectedItem.objects.get(machine=machine)
        onprem = {d.index: source.disk_path(vm_uuid, d.source_disk_key) for d in item.replica_disks.all()}
        failover = timed(api, wire, "planned failover", f"{ITEMS}/{item.pk}/plannedFailover")
        commit_forward = timed(api, wire, "failover commit", f"{ITEMS}/{item.pk}/failoverCommit")
        vm = RecoveredVm.objects.get(item=item, kind="FAILOVER", removed_at__isnull=True)
        original = {i: _sha(p) for i, p in onprem.items()}
        if _recovered_shas(vm) != original:
            raise SystemExit("the recovered VM's disks differ from the on-premises VM's after a planned failover")

        # --- the recovered VM writes 1 % of its blocks.
        recovered_site = _LocalSite(recovery_dir, "", "")
        recovered_site.connect()
        changed = write_changes(recovered_site, vm.vm_id, share, seed=11)
        written = _recovered_shas(vm)

        # --- reprotect, fail back (planned), commit, re-enable: each cold.
        def cold() -> None:
            evict(workdir)
            quiesce()

        cold()
        reprotect = timed(api, wire, "reprotect", f"{ITEMS}/{item.pk}/reProtect")
        cold()
        failback = timed(api, wire, "failback (planned failover to on-premises)", f"{ITEMS}/{item.pk}/plannedFailover")
        home = {i: _sha(p) for i, p in onprem.items()}
        if home != written:
            raise SystemExit("the on-premises disks after the failback differ from the recovered VM's")
        commit = timed(api, wire, "failback commit", f"{ITEMS}/{item.pk}/failoverCommit")
        cold()
        reenable = timed(api, wire, "re-enable", f"{ITEMS}/{item.pk}/reProtect")
        item.refresh_from_db()
        if _replica_shas(item) != written:
            raise SystemExit("the forward replica after re-enabling differs from the on-premises disks")
        figures = Failback.objects.get(item=item).figures

        # --- baseline: a plain cold copy of the same 1 GiB.
        out = os.path.join(workdir, "baseline")
        os.makedirs(out)
        cold()
        t = time.perf_counter()
        copied = plain_copy([onprem[i] for i in sorted(onprem)], out)
        baseline_s = time.perf_counter() - t
        shutil.rmtree(out)
        if copied != total:
            raise SystemExit(f"the plain copy read {copied} bytes of {total}")
    finally:
        for agent in agents:
            agent.close()
        for side in servers:
            servers[side].stop()
            relays[side].close()

    def wire_of(step: dict, side: str) -> dict:
        return step["wire"]["back" if side == "RECOVERY" else "forward"]

    target = 2 * changed["bytes"] + changed["checksum_bytes"]
    out_steps = {}
    for name, step, side, fig in (("reprotect", reprotect, "RECOVERY", figures.get("reprotect", {})),
                                  ("failback", failback, "RECOVERY", figures.get("failback", {})),
                                  ("commit", commit, None, {}),
                                  ("reenable", reenable, "PRIMARY", figures.get("reenable", {}))):
        entry = {"seconds": step["seconds"], "steps": step["steps"], "figures": fig}
        if side:
            w = wire_of(step, side)
            entry.update(wire_to_process_server=w["to_process_server"], wire_from_process_server=w["from_process_server"])
        if "sent_bytes" in fig:
            entry.update(sent_bytes=fig["sent_bytes"], sent_per_changed=round(fig["sent_bytes"] / changed["bytes"], 3),
                         meets_target=fig["sent_bytes"] <= target,
                         wire_total=entry["wire_to_process_server"] + entry["wire_from_process_server"])
            entry["wire_meets_target"] = entry["wire_total"] <= target
        out_steps[name] = entry
    initial_wire = protect["wire"]["forward"]
    report.update({
        "disk_mib": disk_mib, "total_bytes": total, "changed": changed, "target_bytes": target,
        "steps": out_steps,
        "protect": {"seconds": protect["seconds"], "steps": protect["steps"],
                    "wire_to_process_server": initial_wire["to_process_server"],
                    "wire_from_process_server": initial_wire["from_process_server"]},
        "forward_failover_s": failover["seconds"], "forward_commit_s": commit_forward["seconds"],
        "baseline_plain_copy": {"seconds": round(baseline_s, 3), "bytes": copied},
        "verified": ["recovered VM = on-premises after the failover", "on-premises = recovered VM after the failback",
                     "forward replica = on-premises after re-enabling"],
    })
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disk-mib", type=int, nargs="+", default=[768, 256], help="the VM's disks, in MiB")
    parser.add_argument("--changed", type=float, default=0.01, help="share of the 4 KiB blocks the recovered VM writes")
    parser.add_argument("--workdir", default=None, help="where the sites and storage go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (the processes' logs)")
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"),
                        help="page whose failback section is replaced with the results ('' to leave it)")
    args = parser.parse_args(argv)
    if any(m <= 0 or m * MiB % GROUP_BYTES for m in args.disk_mib) or not 0 < args.changed <= 0.5:
        parser.error("disks are whole MiB, more than 0; --changed is more than 0 and at most 0.5")

    workdir = tempfile.mkdtemp(prefix="lifeboat-failback-", dir=args.workdir)
    web_port = _free_port()
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/lifeboat_failbackbench")
    env.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/12")
    # Keys of this run only: Lifeboat refuses the embedded defaults outside the demo.
    env.setdefault("SECRET_KEY", secrets.token_urlsafe(48))
    env.setdefault("LIFEBOAT_SECRETS_KEY", secrets.token_urlsafe(48))
    env.update(DJANGO_SETTINGS_MODULE="lifeboat.settings", LIFEBOAT_DATA_DIR=os.path.join(workdir, "var"),
               LIFEBOAT_CONFIG_URL=f"http://127.0.0.1:{web_port}", LOG_LEVEL=env.get("LOG_LEVEL", "WARNING"))
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
    report: dict = {
        "benchmark": "failback",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": round(os.getloadavg()[0], 2)},
    }
    started = time.perf_counter()
    services = [_web(workdir, env, web_port)]
    workers = Workers(workdir, env)
    services.append(Service("beat", [sys.executable, "-m", "celery", "-A", "lifeboat", "beat", "--loglevel", "WARNING",
                                     "-s", os.path.join(workdir, "beat-schedule")], workdir, env))
    try:
        report.update(run(workdir, env, disk_mib=args.disk_mib, share=args.changed))
    finally:
        workers.close()
        for service in reversed(services):
            service.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    report["run_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    if args.doc:
        write_doc(args.doc, report)
    return 0


SECTION = "## Failback"


def _mib(n: int) -> str:
    return f"{n / MiB:.2f} MiB"


def _steps_text(steps: list[dict]) -> str:
    return ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in steps)


def write_doc(path: str, r: dict) -> None:
    """Replace (or add) the failback section of the benchmarks page."""
    s, c, base, protect = r["steps"], r["changed"], r["baseline_plain_copy"], r["protect"]
    total_mib = r["total_bytes"] // MiB
    disks = " + ".join(f"{m} MiB" for m in r["disk_mib"])
    initial_wire = protect["wire_to_process_server"] + protect["wire_from_process_server"]

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    def sent_row(name: str, label: str) -> str:
        x = s[name]
        return (f"| {label} | {x['seconds']:.1f} s | {_mib(x['sent_bytes'])} ({x['sent_per_changed']:.2f}x the changed "
                f"data) | {_mib(x['wire_to_process_server'])} / {_mib(x['wire_from_process_server'])} | "
                f"{_mib(x['figures'].get('compared_bytes', 0))} |")

    lines = [
        SECTION,
        "",
        f"Written by `python bench/bench_failback.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC ({r['machine']['cpus']} CPUs, {r['machine']['platform']}; load average "
        f"{r['machine']['load_average_at_start']:.2f} before the run, {r['machine']['load_average_at_end']:.2f} at its "
        f"end). The whole failback cycle of one VM with {total_mib} MiB of disks ({disks}, filled with data before it "
        "was protected), through the API, on real processes: the web server, the Celery workers as docker-compose.yml "
        "runs them, celery beat on Lifeboat's schedule, a process server on each side and the agents of both simulated "
        "sites (`replication.agent_host`, with its 5 s assignment polls). After protection, a planned failover and its "
        f"commit, the recovered VM wrote {c['blocks']} 4 KiB blocks ({_mib(c['bytes'])}, {c['bytes'] / r['total_bytes']:.0%}"
        f" of its disks) at places spread over both disks ({c['groups']} of the 64 KiB groups), with random bytes, "
        "through the write filter, and was idle otherwise. Each step's time runs from the API call until its job ends "
        "SUCCEEDED; the page cache is dropped before each but the commit. Bytes on the wire are every byte between the agents and the "
        "process server the step uses, counted by a relay in front of it (TLS and HTTP included). Every landing was "
        "compared byte for byte: the recovered VM with the on-premises VM after the failover, the on-premises VM "
        "with the recovered VM (its writes included) after the failback, the forward replica with the on-premises VM "
        "after re-enabling.",
        "",
        "| step | time | disk data sent | on the wire, to / from the process server | compared |",
        "| --- | --- | --- | --- | --- |",
        sent_row("reprotect", "reprotect (original location)"),
        f"| failback (planned failover to on-premises) | {s['failback']['seconds']:.1f} s | (the last writes: none, "
        f"the VM was idle) | {_mib(s['failback']['wire_to_process_server'])} / "
        f"{_mib(s['failback']['wire_from_process_server'])} | |",
        f"| failback commit | {s['commit']['seconds']:.1f} s | | | |",
        sent_row("reenable", "re-enable replication"),
        "",
        f"Checksum traffic of each comparison: {_mib(c['checksum_bytes'])}, the group digests of every disk "
        f"({_mib(c['group_digest_bytes'])}: 16 bytes per 64 KiB) and the block digests of the {c['groups']} groups "
        f"that differ ({_mib(c['block_digest_bytes'])}: 16 bytes per 4 KiB block). Nothing in Lifeboat counts the "
        "digests an agent fetches, so this is computed from what the pass fetches (`mobility.checksum_pass`); the "
        "bytes from the process server above (digests, acknowledgements, HTTP and TLS) bound it from above.",
        "",
        "| target (the issue's) | measured | limit | |",
        "| --- | --- | --- | --- |",
    ]
    for name, label in (("reprotect", "reprotect"), ("reenable", "re-enable")):
        x = s[name]
        lines += [
            f"| {label}: data sent <= 2x the changed data + the checksum traffic | {_mib(x['sent_bytes'])} | "
            f"{_mib(r['target_bytes'])} | {met(x['meets_target'])} |",
            f"| {label}, stricter: everything on the wire both ways, under the same limit | {_mib(x['wire_total'])} | "
            f"{_mib(r['target_bytes'])} | {met(x['wire_meets_target'])} |",
        ]
    fb = s["failback"]["figures"]
    lines += [
        "",
        f"Baselines, same run: a full copy would have sent {total_mib} MiB. A plain cold copy of it (read + write + "
        f"fsync, as `cp`) took {base['seconds']:.1f} s; Lifeboat's own full copy, the VM's initial replication (what a "
        f"reprotect to an alternate location sends), took {protect['seconds']:.1f} s from the API call (through the "
        f"counting relay) and put {_mib(initial_wire)} on the wire. Reprotect sent {s['reprotect']['sent_bytes'] / r['total_bytes']:.2%} of "
        f"the full copy's bytes and re-enable {s['reenable']['sent_bytes'] / r['total_bytes']:.2%}; reprotect took "
        f"{s['reprotect']['seconds'] / protect['seconds']:.2f}x the initial replication's time and "
        f"{s['reprotect']['seconds'] / base['seconds']:.2f}x the plain copy's, re-enable "
        f"{s['reenable']['seconds'] / protect['seconds']:.2f}x and {s['reenable']['seconds'] / base['seconds']:.2f}x.",
        "",
        f"Where the time goes (each job's steps). Reprotect: {_steps_text(s['reprotect']['steps'])}; the master target "
        f"read {_mib(s['reprotect']['figures'].get('seeded_bytes', 0))} of the original disks into the returning replica "
        f"on-premises in {s['reprotect']['figures'].get('seed_seconds', 0):.1f} s (nothing sent). Failback: "
        f"{_steps_text(s['failback']['steps'])} ({_mib(fb.get('verified_bytes', 0))} written on-premises and read back "
        f"to verify). Commit: {_steps_text(s['commit']['steps'])}. Re-enable: {_steps_text(s['reenable']['steps'])}.",
        "",
        f"For reference, the forward half of the cycle in the same run: protection (initial copy) "
        f"{protect['seconds']:.1f} s, planned failover {r['forward_failover_s']:.1f} s, commit "
        f"{r['forward_commit_s']:.1f} s. The steps that wait for an agent include its assignment poll (up to 5 s), and "
        "those that wait for the replica to apply include beat's apply sweep (every 5 s): on 2 CPUs with a dozen processes the times "
        "move with the machine's load; the bytes do not.",
        "",
    ]
    replace_section(path, SECTION, lines)


if __name__ == "__main__":
    raise SystemExit(main())
