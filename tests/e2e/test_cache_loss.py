"""A process server that loses its cache must never leave a replica silently different from
its source. Real process-server, agent, worker and apply processes; each test ends with the
newest (app-consistent) recovery point of every item compared byte for byte with its quiesced
source disk, the items whose cache was untouched included.

Either nothing acknowledged was lost (the stream goes on after what storage holds), or the
item says it needs a resynchronization, gets one (the vault's off-hours window is the whole
day here, as in the demo) and is exact again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from contextlib import ExitStack
from datetime import time as dtime

import pytest
from django.utils import timezone

from core.choices import JobState
from core.models import Job
from replication.models import MobilityAgent, ProtectedItem
from tests.conftest import bookmarked_point, wait_for
from tests.e2e.harness import MiB, Site, free_port, process_server, sha256_file

pytestmark = pytest.mark.timeout(420)

WORKLOAD = {"rate_bytes_per_s": MiB, "write_size": 32 * 1024, "pattern": "uniform"}


@pytest.fixture
def make_site(tmp_path, live_server, celery_worker):
    sites = []

    def make(vms):
        from vault.models import Vault

        s = Site(tmp=tmp_path, live_url=live_server.url, vms=vms)
        # Resynchronization may start at any time of day (the demo's window), so an item that
        # needs one repairs itself while the test watches.
        Vault.objects.filter(pk=s.vault.pk).update(off_hours_start=dtime(0, 0), off_hours_end=dtime(0, 0))
        sites.append(s)
        return s

    yield make
    for s in sites:
        s.close()


def start_resync_beat(site: Site) -> None:
    """What celery beat does: the off-hours resynchronization sweep, every second."""
    from replication.tasks import offhours_resync

    def beat():
        while not site._stop.wait(1.0):
            offhours_resync.delay()

    t = threading.Thread(target=beat, daemon=True, name="resync-beat")
    t.start()
    site._threads.append(t)


def protect(site: Site, api, names: list[str], server=None) -> dict[str, ProtectedItem]:
    server = server or site.ps
    jobs = {}
    for name in names:
        machine = site.vault.machines.get(name=name)
        r = api.post("/api/v1/replicationProtectedItems/", {"vault": site.vault.pk, "machine": machine.pk,
                                                             "policy": site.policy.pk, "process_server": server.pk},
                     format="json")
        assert r.status_code == 202, r.content
        jobs[name] = r.data["id"]
    for name, job_id in jobs.items():
        job = wait_for(lambda: Job.objects.filter(pk=job_id, state__in=JobState.TERMINAL).first(), timeout=180,
                       message=f"enabling {name}")
        assert job.state == JobState.SUCCEEDED, job.error
    return {name: ProtectedItem.objects.get(machine__name=name, vault=site.vault) for name in names}


def caught_up(item: ProtectedItem) -> bool:
    item.refresh_from_db(fields=["acked_seq", "applied_seq"])
    return item.acked_seq > 0 and item.applied_seq >= item.acked_seq


def wait_caught_up(items) -> None:
    """The replica has applied what the agent had acknowledged (writes may go on)."""
    for item in items:
        wait_for(lambda: caught_up(item) and (time.sleep(1.5) or caught_up(item)), timeout=90,
                 message=f"apply of {item.name} to catch up")


def drained(item: ProtectedItem, since) -> bool:
    """A heartbeat sent after ``since`` reports nothing left to send, and the replica has
    applied all the agent had acknowledged then."""
    item.refresh_from_db(fields=["acked_seq", "applied_seq", "agent_backlog_bytes", "agent_last_heartbeat_at"])
    agent = MobilityAgent.objects.filter(machine=item.machine_id).first()
    status = next((s for s in ((agent and agent.last_status) or {}).get("items", []) if s["item_id"] == str(item.pk)), {})
    return (item.acked_seq > 0 and item.applied_seq >= item.acked_seq and item.agent_backlog_bytes == 0
            and item.agent_last_heartbeat_at is not None and item.agent_last_heartbeat_at > since
            and status.get("phase") == "delta" and item.applied_seq >= (status.get("pass_done_seq") or 0))


def wait_drained(items) -> None:
    """Every write made before this call is applied (the caller has stopped the writes)."""
    since = timezone.now()
    for item in items:
        wait_for(lambda: drained(item, since), timeout=90, message=f"apply of {item.name} to catch up")


def uploads_blocked(tmp_path, item: ProtectedItem):
    """Uploads of the item's logs fail from now on: a file where its logs directory goes
    (unlink it to let them through again)."""
    logs_dir = tmp_path / "storage" / "objects" / "logs" / str(item.pk)
    if logs_dir.exists():
        assert not os.listdir(logs_dir)
        logs_dir.rmdir()
    logs_dir.write_bytes(b"storage unreachable for this item")
    return logs_dir


def cached_batches(item_cache: str) -> list[int]:
    """The seqs of the acknowledged batches an item's cache folder holds."""
    if not os.path.isdir(item_cache):
        return []
    return sorted(int(n.split(".")[0]) for n in os.listdir(item_cache) if n.endswith(".lbs"))


def host_back_without(site: Site, stack: ExitStack, first: ExitStack, first_proc, item_cache: str, logs_dir) -> list[int]:
    """The process server's host dies, and comes back without the item's cache folder and
    with storage reachable again (``uploads_blocked`` undone). Returns the seqs of the
    acknowledged batches the lost folder held."""
    first_proc.kill()
    first_proc.wait(timeout=10)
    first.close()
    lost = cached_batches(item_cache)
    shutil.rmtree(item_cache)
    logs_dir.unlink()
    stack.enter_context(process_server(site.ps_config(), site.tmp))
    return lost


def assert_newest_point_equals_source(site: Site, api, items) -> None:
    """Each item is (again) protected, and a point cut at a quiesced moment equals its source."""
    from replication.scheduling import protected_item_app_consistent_snapshot

    for item in items:
        wait_for(lambda: ProtectedItem.objects.filter(pk=item.pk, protection_state="PROTECTED").exists()
                 and not Job.objects.filter(target_id=str(item.pk), state__in=JobState.ACTIVE).exists(),
                 timeout=240, message=f"{item.name} to be protected again")
        item.refresh_from_db()
        bookmark = protected_item_app_consistent_snapshot(item=item)
        point = bookmarked_point(item, bookmark, timeout=120, message=f"an app-consistent point of {item.name}")
        assert point.type == "app_consistent"
        assert point.time > item.created_at
        for disk in item.replica_disks.all():
            source = sha256_file(site.site.disk_path(item.machine.instance_uuid, disk.source_disk_key))
            body = api.get(f"/api/v1/recoveryPoints/{point.pk}/disks/{disk.index}/image")
            assert body.status_code == 200
            got = hashlib.sha256(b"".join(body.streaming_content)).hexdigest()
            assert got == source, f"{item.name} disk {disk.index}: the newest point differs from the source"


def no_misplaced_logs(site: Site) -> bool:
    from vault.models import Alert

    return not Alert.objects.filter(vault=site.vault, kind="replication_log_misplaced").exists()


def test_whole_cache_lost_after_apply_caught_up(make_site, api, tmp_path):
    """The reported fault: apply has caught up (and deleted its logs), the process server's
    whole cache directory is lost (a rebuilt host: a new certificate too). The stream must go
    on after what the replica holds; an item on another process server is the control."""
    from replication.process_servers import process_server_config
    from vault import services

    site = make_site([{"name": n, "disks": [4 * MiB], "workload": WORKLOAD} for n in ("lost-1", "lost-2", "control")])
    ps2 = services.process_server_create(vault=site.vault, name="ps-control", host="127.0.0.1", data_port=free_port())
    cfg2 = process_server_config(server=ps2, cache_dir=str(tmp_path / "ps2-cache"))
    cfg2["report_interval"] = 1.0
    (tmp_path / "ps2").mkdir()
    cache = site.ps_config()["cache_dir"]
    with ExitStack() as stack:
        stack.enter_context(process_server(cfg2, tmp_path / "ps2"))
        first = ExitStack()
        _, thumb_before = first.enter_context(process_server(site.ps_config(), site.tmp))
        site.start_agents()
        site.start_beat()
        start_resync_beat(site)
        writer = site.start_workload()
        items = protect(site, api, ["lost-1", "lost-2"])
        items.update(protect(site, api, ["control"], server=ps2))
        time.sleep(3)  # deltas flow
        writer.set()
        writer.thread.join(timeout=10)
        wait_drained(items.values())

        first.close()  # the host goes down ...
        shutil.rmtree(cache)  # ... and comes back rebuilt: no cache, no certificate
        _, thumb_after = stack.enter_context(process_server(site.ps_config(), site.tmp))
        assert thumb_after != thumb_before
        writer = site.start_workload()
        time.sleep(6)
        writer.set()
        writer.thread.join(timeout=10)
        assert_newest_point_equals_source(site, api, items.values())
        assert no_misplaced_logs(site)
        # Nothing acknowledged was lost, so nothing needed resynchronizing.
        assert not Job.objects.filter(type="RESYNC", target_id__in=[str(i.pk) for i in items.values()]).exists()


def test_one_items_cache_folder_lost_with_acknowledged_batches_in_it(make_site, api, tmp_path):
    """One item's cache folder is lost while its VM writes at 2 MiB/s and uploads of that item
    are failing, so the folder holds acknowledged batches that storage never got: the agent
    must find the server behind what it acknowledged, the item must say it needs a
    resynchronization, and the resync must make it exact. The other item is the control."""
    fast = {**WORKLOAD, "rate_bytes_per_s": 2 * MiB}
    site = make_site([{"name": "victim", "disks": [8 * MiB], "workload": fast},
                      {"name": "control", "disks": [4 * MiB], "workload": WORKLOAD}])
    cache = site.ps_config()["cache_dir"]
    with ExitStack() as stack:
        first = ExitStack()
        first_proc, _ = first.enter_context(process_server(site.ps_config(), site.tmp))
        site.start_agents()
        site.start_beat()
        start_resync_beat(site)
        writer = site.start_workload()
        items = protect(site, api, ["victim", "control"])
        victim = items["victim"]
        time.sleep(2)
        writer.set()
        writer.thread.join(timeout=10)
        wait_drained(items.values())

        # Uploads of the victim's logs fail from now on: a file where its logs directory goes.
        logs_dir = uploads_blocked(tmp_path, victim)
        writer = site.start_workload()
        item_cache = os.path.join(cache, "items", str(victim.pk))
        wait_for(lambda: len(cached_batches(item_cache)) >= 4, timeout=60,
                 message="acknowledged batches of the victim piling up in the cache")

        host_back_without(site, stack, first, first_proc, item_cache, logs_dir)

        wait_for(lambda: Job.objects.filter(type="RESYNC", target_id=str(victim.pk)).exists(), timeout=120,
                 message="the victim to be resynchronized")
        from vault.models import Event

        assert Event.objects.filter(protected_item=victim, kind="resync_required", severity="WARNING").exists()
        time.sleep(3)
        writer.set()
        writer.thread.join(timeout=10)
        assert_newest_point_equals_source(site, api, items.values())
        resync = Job.objects.filter(type="RESYNC", target_id=str(victim.pk)).order_by("created_at").last()
        assert resync.state == JobState.SUCCEEDED, resync.error
        assert not Job.objects.filter(type="RESYNC", target_id=str(items["control"].pk)).exists()


def test_ticks_lost_with_the_cache_are_sent_again_without_a_resync(make_site, api, tmp_path):
    """An idle item's ticks (the empty batches that keep its RPO fresh) are acknowledged by a
    process server whose cache is lost before they reach storage. No write was lost, so the
    agent sends them again instead of asking for a resynchronization; the stream goes on and
    the next point equals the source."""
    site = make_site([{"name": "idle", "disks": [4 * MiB], "workload": WORKLOAD}])
    cache = site.ps_config()["cache_dir"]
    with ExitStack() as stack:
        first = ExitStack()
        first_proc, _ = first.enter_context(process_server(site.ps_config(), site.tmp))
        site.start_agents(tick_interval=0.5)
        site.start_beat()
        start_resync_beat(site)
        item = protect(site, api, ["idle"])["idle"]
        site.write(64)  # 2 s of the workload
        wait_drained([item])

        # Uploads of the item's logs fail from now on: its ticks stay in the cache, acknowledged.
        logs_dir = uploads_blocked(tmp_path, item)
        item_cache = os.path.join(cache, "items", str(item.pk))
        wait_for(lambda: len(cached_batches(item_cache)) >= 3, timeout=60,
                 message="acknowledged ticks piling up in the cache")
        acked = max(host_back_without(site, stack, first, first_proc, item_cache, logs_dir))

        # The stream goes on past what was lost, without a resync.
        wait_for(lambda: ProtectedItem.objects.get(pk=item.pk).applied_seq > acked, timeout=60,
                 message=f"the replica applying past seq {acked}")
        item.refresh_from_db()
        assert item.protection_state == "PROTECTED"
        assert not Job.objects.filter(type="RESYNC", target_id=str(item.pk)).exists()
        site.write(64)  # 2 s of the workload
        assert_newest_point_equals_source(site, api, [item])
        assert not Job.objects.filter(type="RESYNC", target_id=str(item.pk)).exists()
        assert no_misplaced_logs(site)


def test_process_server_moved_to_a_new_cache_directory_with_a_new_certificate(make_site, api, tmp_path):
    """The process server is started again on a new, empty cache directory (a new certificate)
    while its VMs keep writing: whatever the old cache held, every replica ends exact."""
    site = make_site([{"name": n, "disks": [4 * MiB], "workload": WORKLOAD} for n in ("moved-1", "moved-2")])
    with ExitStack() as stack:
        first = ExitStack()
        _, thumb_before = first.enter_context(process_server(site.ps_config(), site.tmp))
        site.start_agents()
        site.start_beat()
        start_resync_beat(site)
        writer = site.start_workload()
        items = protect(site, api, ["moved-1", "moved-2"])
        time.sleep(4)
        first.close()  # stopped while the VMs write

        config = site.ps_config()
        config["cache_dir"] = str(tmp_path / "new-cache")
        _, thumb_after = stack.enter_context(process_server(config, tmp_path))
        assert thumb_after != thumb_before
        wait_for(lambda: site.ps.__class__.objects.get(pk=site.ps.pk).thumbprint == thumb_after, timeout=30,
                 message="the vault to learn the new certificate")
        time.sleep(6)
        writer.set()
        writer.thread.join(timeout=10)
        assert_newest_point_equals_source(site, api, items.values())
        assert no_misplaced_logs(site)
