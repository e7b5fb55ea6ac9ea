"""Faults the resynchronization must repair, end to end on the simulated site: logs lost or
corrupted in cache storage, an agent restarted with its block map lost, a source VM powered
off hard while it replicates, disks scanned without a frozen view, and the off-hours window.
Real process-server, agent, workload, worker and apply processes; each test ends with a
recovery point cut after the repair compared byte for byte with the source disks.
"""
from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import threading
import time
import zoneinfo
from contextlib import contextmanager
from datetime import datetime, time as dtime, timedelta
from pathlib import Path

import pytest
from django.urls import reverse

from core.choices import JobState
from core.models import Job
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import bookmarked_point, wait_for
from tests.e2e.harness import ROOT, MiB, Site, process_server
from tests.e2e.test_cache_loss import assert_newest_point_equals_source, protect, start_resync_beat, wait_caught_up

pytestmark = pytest.mark.timeout(600)

WORKLOAD = {"rate_bytes_per_s": MiB, "write_size": 32 * 1024, "pattern": "uniform"}


@pytest.fixture
def make_site(tmp_path, live_server, celery_worker):
    sites = []

    def make(vms, *, whole_day: bool = True):
        from vault.models import Vault

        s = Site(tmp=tmp_path, live_url=live_server.url, vms=vms)
        if whole_day:  # resynchronization may start at any time (the demo's window)
            Vault.objects.filter(pk=s.vault.pk).update(off_hours_start=dtime(0, 0), off_hours_end=dtime(0, 0))
        sites.append(s)
        return s

    yield make
    for s in sites:
        s.close()


@contextmanager
def child(args: list[str], log: Path):
    """A process of the site (agent host, workload) that the test may kill hard."""
    out = open(log, "ab")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        out.close()


def agent_host(site: Site):
    return child(["-m", "replication.agent_host", "--site-dir", str(site.site_dir), "--heartbeat-interval", "1"],
                 site.tmp / "agents.log")


def workload(site: Site):
    return child(["-m", "vault.connectors.simsite", "--data-dir", str(site.site_dir), "--seed", "11"],
                 site.tmp / "workload.log")


def hard_kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def log_files(site: Site, item: ProtectedItem) -> list[Path]:
    folder = site.tmp / "storage" / "objects" / "logs" / str(item.pk)
    return sorted(folder.glob("*.lbs")) if folder.is_dir() else []


def resynced(item: ProtectedItem) -> Job:
    job = wait_for(lambda: Job.objects.filter(type="RESYNC", target_id=str(item.pk), state=JobState.SUCCEEDED).first(),
                   timeout=300, message=f"a resynchronization of {item.name} to succeed")
    return job


def test_logs_deleted_or_corrupted_in_cache_storage_are_owned_up_to_and_repaired(make_site, api, settings):
    """Two logs between the process server and apply go bad in cache storage: one is
    corrupted (fails AES-GCM authentication), a later one deleted while the logs after it
    are there. Apply keeps the corrupted one in quarantine, gives the missing one a grace,
    raises a critical alert, marks the item for resynchronization, and the resync makes a
    point byte-exact again. Nothing is dropped silently, no hole is skipped unsaid."""
    from replication import engine
    from vault.models import Alert

    settings.LIFEBOAT_LOG_GAP_GRACE_SECONDS = 3
    site = make_site([{"name": "logs-lost", "disks": [4 * MiB, 2 * MiB], "workload": WORKLOAD}])
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        start_resync_beat(site)
        writer = site.start_workload()
        item = protect(site, api, ["logs-lost"])["logs-lost"]
        wait_caught_up([item])

        # Hold apply off (as a busy worker would) until logs wait in cache storage.
        wait_for(lambda: engine.apply_lease_take(item.pk), timeout=60, message="the apply lease")
        try:
            wait_for(lambda: len(log_files(site, item)) >= 8, timeout=120, message="logs waiting in cache storage")
            logs = log_files(site, item)
            corrupted, deleted = logs[1], logs[4]
            raw = bytearray(corrupted.read_bytes())
            raw[len(raw) // 2] ^= 0x40
            corrupted.unlink()  # (the object may share its inode with the process server's cache)
            corrupted.write_bytes(bytes(raw))
            deleted.unlink()
        finally:
            engine.apply_lease_release(item.pk)
        bad_seq, gone_seq = int(corrupted.name[:20]), int(deleted.name[:20])

        alerts = Alert.objects.filter(protected_item=item, kind="replication_log_lost").order_by("raised_at")
        wait_for(lambda: alerts.count() >= 2, timeout=120, message="critical alerts for both lost logs")
        lost = list(alerts)
        assert all(a.severity == "CRITICAL" for a in lost)
        assert f"log {bad_seq}" in lost[0].message and "quarantine" in lost[0].message
        assert f"log {gone_seq}" in lost[1].message and "missing" in lost[1].message
        quarantine = site.tmp / "storage" / "objects" / "quarantine" / str(item.pk)
        kept = list(quarantine.iterdir())
        assert len(kept) == 1 and kept[0].read_bytes() == bytes(raw)  # kept intact, never deleted
        from vault.models import Event

        assert Event.objects.filter(protected_item=item, kind="resync_required",
                                    message__contains="cache storage").exists()
        resynced(item)
        time.sleep(2)
        writer.set()
        writer.thread.join(timeout=10)
        assert_newest_point_equals_source(site, api, [item])


def test_agent_restarted_with_a_lost_block_map_converges(make_site, api):
    """The agent is killed (SIGKILL) while its VM writes, its block maps are deleted, and it
    is started again; later it is killed again and its whole item state is lost. Each time
    replication converges and a point equals the source byte for byte."""
    site = make_site([{"name": "map-lost", "disks": [4 * MiB], "workload": WORKLOAD}])
    machine = site.vault.machines.get(name="map-lost")
    state_dir = site.site_dir / "agents" / machine.instance_uuid
    with process_server(site.ps_config(), site.tmp):
        site.start_beat()
        start_resync_beat(site)
        writer = site.start_workload()
        with agent_host(site) as agents:
            item = protect(site, api, ["map-lost"])["map-lost"]
            time.sleep(3)
            hard_kill(agents)
        item_dir = state_dir / "items" / str(item.pk)
        maps = list(item_dir.glob("blockmap-*"))
        assert maps, "the agent keeps a block map per disk"
        for path in maps:
            path.unlink()
        with agent_host(site) as agents:
            time.sleep(4)
            wait_caught_up([item])
            hard_kill(agents)
        for path in item_dir.iterdir():  # the item's whole state: its stream, plans and maps
            path.unlink()
        with agent_host(site):
            time.sleep(4)
            writer.set()
            writer.thread.join(timeout=10)
            assert_newest_point_equals_source(site, api, [item])


def test_source_vm_powered_off_hard_during_replication(make_site, api):
    """The VM's writer dies mid-write and the agent is killed (SIGKILL) as the VM is powered
    off hard; the VM is powered on again and the agent restarts. The write journal's unclean
    stop is noticed, the disk is resynchronized, and a point equals the source."""
    from vault.models import Event

    site = make_site([{"name": "hard-off", "disks": [4 * MiB, 2 * MiB], "workload": {**WORKLOAD, "rate_bytes_per_s": 2 * MiB}}])
    machine = site.vault.machines.get(name="hard-off")
    with process_server(site.ps_config(), site.tmp):
        site.start_beat()
        start_resync_beat(site)
        with agent_host(site) as agents, workload(site) as writer:
            item = protect(site, api, ["hard-off"])["hard-off"]
            time.sleep(3)
            hard_kill(writer)  # the power goes: the guest's writes stop mid-stream ...
            hard_kill(agents)  # ... and the agent with them
            site.site.power_off(machine.instance_uuid)
        site.site.power_on(machine.instance_uuid)
        with agent_host(site), workload(site) as writer:
            wait_for(lambda: Event.objects.filter(protected_item=item, kind="resync_required",
                                                  message__contains="hard power-off").exists(),
                     timeout=120, message="the unclean stop of the write journal to be noticed")
            resynced(item)
            time.sleep(2)
            writer.terminate()
            writer.wait(timeout=15)
            assert_newest_point_equals_source(site, api, [item])


def test_points_of_a_disk_scanned_without_a_frozen_view_are_labelled_and_never_the_default(
        make_site, api, client, admin_user, live_server, tmp_path):
    """A physical machine's disk has no write journal: the agent tracks it by rescans of the
    live disk, so its points may mix moments. They are labelled not crash-consistent in the
    API and the portal and are never the default point for a failover; the data still
    arrives byte-exact once the disk is still."""
    from core.exceptions import ValidationFailed
    from mobility.agent import Agent
    from recovery_plans.services import recovery_point_choose
    from replication.scheduling import protected_item_app_consistent_snapshot

    site = make_site([])
    disk = tmp_path / "phys-disk.img"
    rng = random.Random(5)
    disk.write_bytes(rng.randbytes(4 * MiB))
    agent = Agent(state_dir=str(tmp_path / "phys-agent"), config_url=live_server.url,
                  passphrase="e2e-passphrase-long-enough",
                  machine={"name": "phys-01", "os": "Linux", "disks": [{"key": 0, "path": str(disk), "capacity_bytes": 4 * MiB}]},
                  heartbeat_interval=1.0, assignment_interval=0.5, scan_interval=0.3)
    agent.register()
    stop_writes = threading.Event()

    def write_live() -> None:
        with open(disk, "r+b") as f:
            while not stop_writes.wait(0.02):
                f.seek(rng.randrange(0, 1024) * 4096)
                f.write(rng.randbytes(4096))
                f.flush()

    writer = threading.Thread(target=write_live, daemon=True)
    agent_thread = threading.Thread(target=agent.run_forever, args=(site._stop,), daemon=True)
    agent_thread.start()
    site._threads.append(agent_thread)
    with process_server(site.ps_config(), site.tmp):
        site.start_beat()
        writer.start()
        item = protect(site, api, ["phys-01"])["phys-01"]
        wait_for(lambda: RecoveryPoint.objects.filter(item=item).count() >= 2, timeout=120, message="points of phys-01")
        body = api.get("/api/v1/recoveryPoints/", {"item": str(item.pk)}).json()
        rows = body["results"] if isinstance(body, dict) else body
        assert rows and {r["type"] for r in rows} == {"not_crash_consistent"}
        client.force_login(admin_user)
        page = client.get(reverse("portal:item-detail", args=[item.pk]))
        assert page.status_code == 200 and "Not crash-consistent" in page.content.decode()
        with pytest.raises(ValidationFailed, match="not crash-consistent"):
            recovery_point_choose(item=item, point="latest")
        stop_writes.set()
        writer.join(timeout=10)

        # Once the disk is still, a scan after a bookmark reads it whole: that point equals it.
        bookmark = protected_item_app_consistent_snapshot(item=item)
        point = bookmarked_point(item, bookmark, timeout=120, message="the bookmarked point")
        assert point.type == "not_crash_consistent"
        chosen = recovery_point_choose(item=item, point="custom", recovery_point_id=point.pk)
        image = api.get(f"/api/v1/recoveryPoints/{chosen.pk}/disks/0/image")
        assert hashlib.sha256(b"".join(image.streaming_content)).hexdigest() == hashlib.sha256(disk.read_bytes()).hexdigest()


SNAPSHOT_SCRIPT = """
import fcntl, os, shutil, sys, uuid
command, *paths = sys.argv[1:]
if command == "create":  # every disk's view at one moment: the guest's writes are held meanwhile
    with open(os.environ["LIFEBOAT_TEST_IO_LOCK"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        views = []
        for path in paths:
            views.append(f"{path}.view-{uuid.uuid4().hex[:8]}")
            shutil.copyfile(path, views[-1])
    print("\\n".join(views))
else:
    for view in paths:
        os.unlink(view)
"""


def test_points_of_a_disk_scanned_through_frozen_views_are_crash_consistent(make_site, api, live_server, tmp_path,
                                                                            monkeypatch):
    """The same physical machine, with a snapshot command (as an LVM snapshot would be): a
    scan pass reads views of its disks taken at one moment, so the point cut with the pass's
    last batch is crash-consistent and may be the default; a point cut once the disk is
    still equals it byte for byte."""
    import fcntl

    from mobility.agent import Agent
    from recovery_plans.services import recovery_point_choose
    from replication.scheduling import protected_item_app_consistent_snapshot

    site = make_site([])
    disk = tmp_path / "frozen-disk.img"
    rng = random.Random(6)
    disk.write_bytes(rng.randbytes(4 * MiB))
    script = tmp_path / "snapshot.py"
    script.write_text(SNAPSHOT_SCRIPT)
    io_lock = tmp_path / "io.lock"
    monkeypatch.setenv("LIFEBOAT_TEST_IO_LOCK", str(io_lock))
    agent = Agent(state_dir=str(tmp_path / "frozen-agent"), config_url=live_server.url,
                  passphrase="e2e-passphrase-long-enough",
                  machine={"name": "phys-02", "os": "Linux", "disks": [{"key": 0, "path": str(disk), "capacity_bytes": 4 * MiB}]},
                  heartbeat_interval=1.0, assignment_interval=0.5, scan_interval=0.3,
                  snapshot_command=f"{sys.executable} {script}")
    agent.register()
    stop_writes = threading.Event()

    def write_live() -> None:
        with open(disk, "r+b") as f, open(io_lock, "w") as lock:
            while not stop_writes.wait(0.02):
                fcntl.flock(lock, fcntl.LOCK_SH)
                f.seek(rng.randrange(0, 1024) * 4096)
                f.write(rng.randbytes(4096))
                f.flush()
                fcntl.flock(lock, fcntl.LOCK_UN)

    writer = threading.Thread(target=write_live, daemon=True)
    agent_thread = threading.Thread(target=agent.run_forever, args=(site._stop,), daemon=True)
    agent_thread.start()
    site._threads.append(agent_thread)
    with process_server(site.ps_config(), site.tmp):
        site.start_beat()
        writer.start()
        item = protect(site, api, ["phys-02"])["phys-02"]
        wait_for(lambda: RecoveryPoint.objects.filter(item=item, type="crash_consistent").exists(), timeout=120,
                 message="a crash-consistent point from a frozen scan")
        assert recovery_point_choose(item=item, point="latest").type == "crash_consistent"
        stop_writes.set()
        writer.join(timeout=10)
        bookmark = protected_item_app_consistent_snapshot(item=item)
        point = bookmarked_point(item, bookmark, timeout=120, message="the bookmarked point")
        assert point.type == "app_consistent"
        assert recovery_point_choose(item=item, point="latest").pk == point.pk
        image = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/0/image")
        assert hashlib.sha256(b"".join(image.streaming_content)).hexdigest() == hashlib.sha256(disk.read_bytes()).hexdigest()


def test_offhours_resync_waits_for_the_window_then_runs(make_site, api):
    """An item needs resynchronization while the vault's off-hours window (in its own time
    zone) is closed: the sweep, enqueued every second on the real worker, leaves it alone
    until the window opens, then resynchronizes it; a point cut after equals the source."""
    from replication.services import protected_item_mark_resync_required
    from vault.models import Vault

    site = make_site([{"name": "offhours", "disks": [4 * MiB], "workload": WORKLOAD}], whole_day=False)
    zone = "Asia/Kolkata"  # not the server's zone: the window is the vault's
    local_now = datetime.now(zoneinfo.ZoneInfo(zone))
    opens = (local_now + timedelta(seconds=30)).replace(microsecond=0)  # the window is kept to the second
    Vault.objects.filter(pk=site.vault.pk).update(off_hours_time_zone=zone, off_hours_start=opens.time(),
                                                  off_hours_end=(opens + timedelta(hours=2)).time())
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        start_resync_beat(site)
        writer = site.start_workload()
        item = protect(site, api, ["offhours"])["offhours"]
        assert protected_item_mark_resync_required(item=item, reason="test: data lost in transit")
        assert datetime.now(zoneinfo.ZoneInfo(zone)) < opens - timedelta(seconds=10), "protecting took too long to test"
        # Until the window opens the item waits, however often the sweep runs.
        while datetime.now(zoneinfo.ZoneInfo(zone)) < opens - timedelta(seconds=3):
            item.refresh_from_db()
            assert item.protection_state == "RESYNC_REQUIRED"
            assert not Job.objects.filter(type="RESYNC", target_id=str(item.pk)).exists()
            time.sleep(1)
        job = resynced(item)
        assert job.created_at.astimezone(zoneinfo.ZoneInfo(zone)) >= opens
        writer.set()
        writer.thread.join(timeout=10)
        assert_newest_point_equals_source(site, api, [item])
