"""The simulated site: the connector contract, its files, and the workload runner's writes."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

from mobility.filter import read_journal
from vault.connectors import (
    AuthenticationFailed,
    ConnectorError,
    NotFound,
    OperationFailed,
    Unreachable,
    open_connector,
)
from vault.connectors.simsite import WorkloadRunner, run_workload
from vault.connectors.simulated import SimulatedSite, vm_uuid_for

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "Sim-S3cret-pw"
MiB = 1024 * 1024


def wait_for(predicate, *, timeout: float = 20.0, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(0.02)


class FakeClock:
    """The runner's clock, moved by the test: rates become exact byte counts."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def site(tmp_path):
    created = SimulatedSite.create(
        tmp_path / "site",
        user="admin",
        password=PASSWORD,
        vms=[
            {"name": "web-01", "disks": [4 * MiB, 2 * MiB], "guest_os": "ubuntu64Guest"},
            {"name": "db-01", "disks": [8 * MiB]},
            {"name": "idle-01", "power_state": "poweredOff", "host": "esx-02.sim.local"},
        ],
    )
    created.connect()
    yield created
    created.close()


def uuid_of(name: str) -> str:
    return vm_uuid_for(name)


def state(site) -> dict:
    return json.loads(Path(site.data_dir, "site.json").read_text())


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def replay(original: str, records, target: str) -> None:
    shutil.copyfile(original, target)
    with open(target, "r+b") as f:
        for rec in records:
            f.seek(rec.offset)
            f.write(rec.data)


# --- the connector contract --------------------------------------------------------------


def test_discovery_lists_the_seeded_vms_with_real_sparse_disks(site):
    inventory = site.discover()
    assert inventory.datacenters == ("Datacenter",)
    assert inventory.clusters == ("Cluster",)
    assert inventory.hosts == ("esx-01.sim.local", "esx-02.sim.local")
    assert inventory.datastores == ("datastore1",)
    assert [v.name for v in inventory.vms] == ["db-01", "idle-01", "web-01"]
    web = next(v for v in inventory.vms if v.name == "web-01")
    assert web.instance_uuid == uuid_of("web-01")
    assert (web.power_state, web.guest_os, web.cluster, web.datacenter) == ("poweredOn", "ubuntu64Guest", "Cluster", "Datacenter")
    assert [(d.key, d.capacity_bytes, d.datastore) for d in web.disks] == [(2000, 4 * MiB, "datastore1"), (2001, 2 * MiB, "datastore1")]
    assert web.disks[0].backing_file == "[datastore1] web-01/web-01.vmdk"
    assert next(v for v in inventory.vms if v.name == "idle-01").power_state == "poweredOff"
    for disk in web.disks:
        path = site.disk_path(web.instance_uuid, disk.key)
        assert path == os.path.join(site.data_dir, "disks", web.instance_uuid, f"{disk.key}.img")
        assert os.path.getsize(path) == disk.capacity_bytes
        assert os.stat(path).st_blocks * 512 < disk.capacity_bytes  # sparse
    assert site.journal_dir(web.instance_uuid, 2000) == os.path.join(site.data_dir, "journal", web.instance_uuid, "2000")
    assert site.get_vm(web.instance_uuid) == web
    assert site.about().api_type == "Simulated"


def test_wrong_password_or_user_is_refused_without_revealing_it(site, caplog):
    caplog.set_level(logging.DEBUG)
    for user, password in (("admin", "Wrong-Pa55"), ("root", PASSWORD)):
        other = SimulatedSite(site.data_dir, user, password)
        with pytest.raises(AuthenticationFailed) as excinfo:
            other.connect()
        assert str(excinfo.value) == f"Simulated site {site.data_dir} rejected the user name or password"
        assert password not in str(excinfo.value) + repr(other)
        with pytest.raises(ConnectorError, match="Not connected"):
            other.discover()
    assert PASSWORD not in caplog.text and "Wrong-Pa55" not in caplog.text
    stored = Path(site.data_dir, "site.json").read_text()
    assert PASSWORD not in stored  # only a salted hash is kept


def test_a_missing_site_is_unreachable(tmp_path):
    with pytest.raises(Unreachable, match="There is no simulated site in"):
        SimulatedSite(tmp_path / "nowhere", "admin", PASSWORD).connect()


def test_open_connector_simulated(site):
    conn = open_connector("simulated", data_dir=site.data_dir, user="admin", password=PASSWORD)
    with conn:
        assert [v.name for v in conn.discover().vms] == ["db-01", "idle-01", "web-01"]
    with pytest.raises(ConnectorError):
        conn.discover()  # closed


def test_creating_a_site_twice_is_refused(site, tmp_path):
    assert SimulatedSite.exists(site.data_dir) and not SimulatedSite.exists(tmp_path / "other")
    with pytest.raises(ConnectorError, match="already exists"):
        SimulatedSite.create(site.data_dir, user="admin", password=PASSWORD)


def test_unknown_vm_is_not_found_everywhere(site):
    missing = str(uuid.uuid4())
    for call in (
        lambda: site.get_vm(missing),
        lambda: site.power_on(missing),
        lambda: site.power_off(missing),
        lambda: site.shutdown_guest(missing),
        lambda: site.create_quiesced_snapshot(missing, "s"),
        lambda: site.list_snapshots(missing),
        lambda: site.remove_snapshot(missing, "snapshot-1"),
        lambda: site.destroy_vm(missing),
        lambda: site.recent_events(missing),
        lambda: site.set_workload(missing, rate_bytes_per_s=1, write_size=512, pattern="uniform"),
        lambda: site.resize_disk(missing, 2000, 8 * MiB),
        lambda: site.disk_path(missing, 2000),
    ):
        with pytest.raises(NotFound, match=f"No VM with instance UUID {missing} on Simulated site"):
            call()
    with pytest.raises(NotFound, match="has no disk 2999"):
        site.disk_path(uuid_of("web-01"), 2999)


def test_quiesced_snapshot_is_recorded_and_removed(site):
    web = uuid_of("web-01")
    snap = site.create_quiesced_snapshot(web, "app-1")
    assert snap.quiesced and snap.name == "app-1" and snap.created.tzinfo is not None
    recorded = state(site)["vms"][web]["snapshots"]
    assert [(s["id"], s["name"], s["quiesced"]) for s in recorded] == [(snap.id, "app-1", True)]
    cold = site.create_quiesced_snapshot(uuid_of("idle-01"), "cold")
    assert not cold.quiesced  # nothing to quiesce in a powered-off VM
    second = site.create_quiesced_snapshot(web, "app-2")
    assert [s.id for s in site.list_snapshots(web)] == [snap.id, second.id]
    assert len({snap.id, cold.id, second.id}) == 3
    site.remove_snapshot(web, snap.id)
    assert [s.id for s in site.list_snapshots(web)] == [second.id]
    with pytest.raises(NotFound, match="has no snapshot"):
        site.remove_snapshot(web, snap.id)


def test_power_operations_change_the_power_state_and_leave_events(site):
    web = uuid_of("web-01")
    site.power_off(web)
    assert state(site)["vms"][web]["power_state"] == "poweredOff"
    site.power_off(web)
    site.shutdown_guest(web)
    site.power_on(web)
    assert site.get_vm(web).power_state == "poweredOn"
    site.power_on(web)
    site.shutdown_guest(web)
    assert site.get_vm(web).power_state == "poweredOff"
    events = site.recent_events(web, limit=3)
    assert [e.type for e in events] == ["VmPoweredOffEvent", "VmGuestShutdownEvent", "VmPoweredOnEvent"]
    assert events[0].message == "web-01 on esx-01.sim.local in Datacenter is powered off"
    assert [e.time for e in events] == sorted((e.time for e in events), reverse=True)
    assert [e.type for e in reversed(site.recent_events(web))] == [
        "VmCreatedEvent", "VmStoppingEvent", "VmPoweredOffEvent", "VmStartingEvent", "VmPoweredOnEvent",
        "VmGuestShutdownEvent", "VmPoweredOffEvent"]  # a no-op leaves no event


def test_create_vm_makes_sparse_disks_and_destroy_removes_everything(site):
    created = site.create_vm(name="replica-01", host="esx-02.sim.local", datastore="datastore1",
                             disk_capacities_bytes=[3 * MiB, 512 * 3], datacenter="Datacenter")
    assert created.power_state == "poweredOff" and created.host == "esx-02.sim.local"
    assert [d.capacity_bytes for d in created.disks] == [3 * MiB, 1536]
    for disk in created.disks:
        assert os.path.getsize(site.disk_path(created.instance_uuid, disk.key)) == disk.capacity_bytes
    assert created in site.discover().vms
    with pytest.raises(OperationFailed, match="the name 'replica-01' already exists"):
        site.create_vm(name="replica-01", host="esx-02.sim.local", datastore="datastore1", disk_capacities_bytes=[MiB])
    with pytest.raises(NotFound, match="has no host esx-09"):
        site.create_vm(name="x", host="esx-09", datastore="datastore1", disk_capacities_bytes=[MiB])
    with pytest.raises(NotFound, match="has no datastore nfs9"):
        site.create_vm(name="x", host="esx-02.sim.local", datastore="nfs9", disk_capacities_bytes=[MiB])
    with pytest.raises(NotFound, match="has no datacenter DC9"):
        site.create_vm(name="x", host="esx-02.sim.local", datastore="datastore1", disk_capacities_bytes=[MiB],
                       datacenter="DC9")
    with pytest.raises(ValueError, match="multiple of 512"):
        site.create_vm(name="x", host="esx-02.sim.local", datastore="datastore1", disk_capacities_bytes=[1000])

    site.power_on(created.instance_uuid)
    site.destroy_vm(created.instance_uuid)
    assert created.instance_uuid not in state(site)["vms"]
    assert not os.path.exists(os.path.join(site.data_dir, "disks", created.instance_uuid))
    with pytest.raises(NotFound):
        site.destroy_vm(created.instance_uuid)


def test_workload_settings_are_checked(site):
    web = uuid_of("web-01")
    for bad in (dict(write_size=1000), dict(write_size=0), dict(pattern="random"), dict(rate_bytes_per_s=-1)):
        args = dict(rate_bytes_per_s=MiB, write_size=4096, pattern="uniform") | bad
        with pytest.raises(ValueError):
            site.set_workload(web, **args)


# --- the workload runner -----------------------------------------------------------------


def run_steps(runner: WorkloadRunner, clock: FakeClock, *, seconds: float, dt: float = 0.1) -> None:
    for _ in range(round(seconds / dt)):
        runner.step()
        clock.now += dt
    runner.step()


@pytest.mark.parametrize("pattern", ["uniform", "hotspot", "sequential"])
def test_each_pattern_writes_aligned_in_bounds_at_the_configured_rate(site, pattern):
    web = uuid_of("web-01")
    rate, write_size, seconds = 2 * MiB, 8192, 3.0
    site.set_workload(web, rate_bytes_per_s=rate, write_size=write_size, pattern=pattern)
    clock = FakeClock()
    runner = WorkloadRunner(site, seed=7, clock=clock)
    try:
        run_steps(runner, clock, seconds=seconds)
    finally:
        runner.close()

    capacities = {d.key: d.capacity_bytes for d in site.get_vm(web).disks}
    journaled = {key: list(read_journal(site.journal_dir(web, key))) for key in capacities}
    total = sum(len(r.data) for records in journaled.values() for r in records)
    assert abs(total - rate * seconds) <= write_size  # the token bucket, to one write
    assert {k[0] for k in runner.stats} == {web}  # db-01 has no workload, idle-01 is off
    for key, records in journaled.items():
        assert runner.stats[(web, key)].bytes == sum(len(r.data) for r in records)
        assert runner.stats[(web, key)].writes == len(records)
        assert abs(len(records) - len(journaled[2000])) <= 1  # round-robin over the disks
        for rec in records:
            assert rec.offset % 512 == 0 and len(rec.data) == write_size
            assert 0 <= rec.offset and rec.offset + len(rec.data) <= capacities[key]
        offsets = [r.offset for r in records]
        if pattern == "sequential":
            assert offsets == [(i * write_size) % capacities[key] for i in range(len(offsets))]
        elif pattern == "hotspot":
            window = capacities[key] // 16 + write_size
            best = max(sum(1 for o in offsets if start <= o < start + window) for start in offsets)
            assert best >= 0.75 * len(offsets)
        else:
            assert max(offsets) - min(offsets) > capacities[key] // 2
            assert len(set(offsets)) > 0.5 * len(offsets)
    data = b"".join(r.data for records in journaled.values() for r in records)
    ratio = len(zlib.compress(data, 6)) / len(data)
    assert 0.15 < ratio < 0.85  # some blocks compress, some do not


def test_every_write_is_journaled_in_order_and_replaying_gives_the_disk(site):
    web, db = uuid_of("web-01"), uuid_of("db-01")
    disks = [(web, 2000), (web, 2001), (db, 2000)]
    originals = {}
    for vm_uuid, key in disks:
        originals[(vm_uuid, key)] = os.path.join(site.data_dir, f"original-{vm_uuid}-{key}.img")
        shutil.copyfile(site.disk_path(vm_uuid, key), originals[(vm_uuid, key)])
    site.set_workload(web, rate_bytes_per_s=4 * MiB, write_size=4096, pattern="hotspot")
    site.set_workload(db, rate_bytes_per_s=2 * MiB, write_size=65536, pattern="uniform")
    writes: list[tuple[str, int, int, bytes]] = []
    stop = threading.Event()
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(stats=run_workload(site, stop, tick=0.01, seed=3, on_write=lambda *w: writes.append(w))))
    thread.start()
    try:
        wait_for(lambda: all(sum(1 for w in writes if (w[0], w[1]) == d) >= 20 for d in disks),
                 message="20 writes on every disk")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()

    for vm_uuid, key in disks:
        records = list(read_journal(site.journal_dir(vm_uuid, key)))
        made = [(offset, data) for v, k, offset, data in writes if (v, k) == (vm_uuid, key)]
        assert [(r.offset, r.data) for r in records] == made  # every write, in the order made
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        assert [r.time_ns for r in records] == sorted(r.time_ns for r in records)
        assert result["stats"][(vm_uuid, key)].bytes == sum(len(d) for _o, d in made)
        replayed = os.path.join(site.data_dir, "replayed.img")
        replay(originals[(vm_uuid, key)], records, replayed)
        assert sha256(replayed) == sha256(site.disk_path(vm_uuid, key))
        assert sha256(originals[(vm_uuid, key)]) != sha256(site.disk_path(vm_uuid, key))


def test_changes_in_site_json_apply_at_the_next_reload(site):
    web = uuid_of("web-01")
    site.set_workload(web, rate_bytes_per_s=MiB, write_size=4096, pattern="uniform")
    clock = FakeClock()
    runner = WorkloadRunner(site, seed=1, clock=clock, reload_interval=1.0)
    try:
        run_steps(runner, clock, seconds=1.0)
        written = sum(s.bytes for s in runner.stats.values())
        site.power_off(web)
        run_steps(runner, clock, seconds=2.0)  # at most until the next reload
        after_off = sum(s.bytes for s in runner.stats.values())
        assert after_off - written <= MiB * 1.0 + 4096
        run_steps(runner, clock, seconds=2.0)
        assert sum(s.bytes for s in runner.stats.values()) == after_off  # off: no writes
        site.set_workload(web, rate_bytes_per_s=2 * MiB, write_size=4096, pattern="sequential")
        site.power_on(web)
        run_steps(runner, clock, seconds=1.0)  # reload
        before = sum(s.bytes for s in runner.stats.values())
        run_steps(runner, clock, seconds=2.0)
        assert abs(sum(s.bytes for s in runner.stats.values()) - before - 2 * MiB * 2.0) <= 2 * 4096
    finally:
        runner.close()


def test_resize_grows_the_disk_and_writes_reach_the_new_space(site):
    web = uuid_of("web-01")
    with pytest.raises(OperationFailed, match="cannot shrink"):
        site.resize_disk(web, 2001, MiB)
    with pytest.raises(NotFound, match="has no disk 2099"):
        site.resize_disk(web, 2099, 8 * MiB)
    site.set_workload(web, rate_bytes_per_s=4 * MiB, write_size=65536, pattern="sequential")
    clock = FakeClock()
    runner = WorkloadRunner(site, seed=1, clock=clock)
    try:
        site.resize_disk(web, 2001, 6 * MiB)
        assert os.path.getsize(site.disk_path(web, 2001)) == 6 * MiB
        assert site.get_vm(web).disks[1].capacity_bytes == 6 * MiB
        assert site.recent_events(web, limit=1)[0].type == "VmReconfiguredEvent"
        run_steps(runner, clock, seconds=3.0)
    finally:
        runner.close()
    records = list(read_journal(site.journal_dir(web, 2001)))
    assert max(r.offset + len(r.data) for r in records) > 2 * MiB
    assert all(r.offset + len(r.data) <= 6 * MiB for r in records)


def test_a_quiesced_snapshot_pauses_writes_and_bookmarks_the_journal(site):
    web = uuid_of("web-01")
    site.set_workload(web, rate_bytes_per_s=MiB, write_size=4096, pattern="uniform")
    clock = FakeClock()
    runner = WorkloadRunner(site, seed=5, clock=clock)
    try:
        run_steps(runner, clock, seconds=1.0)
        with site._quiesced(web):
            before = sum(s.bytes for s in runner.stats.values())
            run_steps(runner, clock, seconds=1.0)
            assert sum(s.bytes for s in runner.stats.values()) == before  # frozen
        snap = site.create_quiesced_snapshot(web, "app")
        bookmark = site.snapshot_journal_seq(web, snap.id)
        run_steps(runner, clock, seconds=1.0)
    finally:
        runner.close()
    for key in (2000, 2001):
        records = list(read_journal(site.journal_dir(web, key)))
        assert bookmark[key] == runner.stats[(web, key)].writes - sum(1 for r in records if r.seq > bookmark[key])
        assert all(r.time_ns <= snap.created.timestamp() * 1e9 for r in records if r.seq <= bookmark[key])
        assert any(r.seq > bookmark[key] for r in records)


def test_only_one_workload_runner_per_site(site):
    first = WorkloadRunner(site)
    try:
        with pytest.raises(ConnectorError, match="Another workload runner"):
            WorkloadRunner(site)
    finally:
        first.close()
    WorkloadRunner(site).close()


def test_runner_command_writes_until_terminated(site):
    web = uuid_of("web-01")
    original = os.path.join(site.data_dir, "original.img")
    shutil.copyfile(site.disk_path(web, 2000), original)
    site.set_workload(web, rate_bytes_per_s=2 * MiB, write_size=4096, pattern="uniform")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "vault.connectors.simsite", "--data-dir", site.data_dir, "--tick", "0.01"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        journal = site.journal_dir(web, 2000)
        wait_for(lambda: sum(1 for _ in read_journal(journal)) >= 20, message="the runner's first writes")
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output
    assert "Stopped after writing" in output
    replayed = os.path.join(site.data_dir, "replayed.img")
    replay(original, read_journal(journal), replayed)
    assert sha256(replayed) == sha256(site.disk_path(web, 2000))


CONCURRENT_WRITER = textwrap.dedent("""
    import sys, time, os
    from vault.connectors.simulated import SimulatedSite
    data_dir, vm_uuid, go, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    site = SimulatedSite(data_dir, "admin", sys.argv[5])
    site.connect()
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.001)
    for i in range(count):
        site.create_quiesced_snapshot(vm_uuid, f"p{os.getpid()}-{i}")
        site.set_workload(vm_uuid, rate_bytes_per_s=i, write_size=512, pattern="uniform")
""")


def test_concurrent_updates_from_two_processes_lose_nothing(site):
    count = 25
    go = os.path.join(site.data_dir, "go")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, site.data_dir, uuid_of(name), go, str(count), PASSWORD],
                         env=env, stderr=subprocess.PIPE)
        for name in ("web-01", "db-01")
    ]
    Path(go).touch()
    for proc in procs:
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    vms = state(site)["vms"]
    ids = [s["id"] for name in ("web-01", "db-01") for s in vms[uuid_of(name)]["snapshots"]]
    assert len(vms[uuid_of("web-01")]["snapshots"]) == len(vms[uuid_of("db-01")]["snapshots"]) == count
    assert sorted(ids) == sorted(f"snapshot-{i}" for i in range(1, 2 * count + 1))
    assert vms[uuid_of("web-01")]["workload"]["rate_bytes_per_s"] == count - 1
    assert vms[uuid_of("db-01")]["workload"]["rate_bytes_per_s"] == count - 1


def test_a_quiesced_snapshot_runs_the_guests_freeze_hook(site):
    """As VMware Tools runs a guest's freeze scripts while vCenter holds its writes, the
    simulated site runs the VM's agent's freeze hook: a bookmark request at exactly the
    journal positions of the quiesced moment, with the vault's id and label."""
    import json as _json

    web = uuid_of("web-01")
    site.set_workload(web, rate_bytes_per_s=MiB, write_size=4096, pattern="uniform")
    clock = FakeClock()
    runner = WorkloadRunner(site, seed=6, clock=clock)
    agent_dir = os.path.join(site.data_dir, "agents", web)
    os.makedirs(agent_dir)
    disks = site.get_vm(web).disks
    item = "6f1c0c1e-1111-4222-8333-944455556666"
    with open(os.path.join(agent_dir, "assignment.json"), "w") as f:
        _json.dump({"items": [{"item_id": item, "item_token": "t", "process_server_url": "https://127.0.0.1:1",
                               "process_server_thumbprint": "x",
                               "disks": [{"index": i, "key": str(d.key), "path": site.disk_path(web, d.key),
                                          "journal_dir": site.journal_dir(web, d.key)} for i, d in enumerate(disks)]}]}, f)
    try:
        run_steps(runner, clock, seconds=1.0)
        snap = site.create_quiesced_snapshot(web, "app", guest_bookmark={"id": "b-1", "label": "nightly"})
        run_steps(runner, clock, seconds=1.0)  # the VM writes on
    finally:
        runner.close()
    [name] = os.listdir(os.path.join(agent_dir, "requests"))
    with open(os.path.join(agent_dir, "requests", name)) as f:
        request = _json.load(f)
    at_quiesce = site.snapshot_journal_seq(web, snap.id)
    assert (request["item_id"], request["id"], request["label"]) == (item, "b-1", "nightly")
    assert request["positions"] == {str(i): at_quiesce[d.key] for i, d in enumerate(disks)}
    assert all(at_quiesce[d.key] > 0 for d in disks)
    # A VM with no agent (nothing to call) is quiesced as before.
    site.create_quiesced_snapshot(uuid_of("idle-01"), "cold", guest_bookmark={"id": "b-2", "label": "x"})
