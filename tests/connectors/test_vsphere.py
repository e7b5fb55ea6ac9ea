"""The pyVmomi connector against a real vCenter simulator (vcsim), checked against vcsim's own
view of its inventory."""
from __future__ import annotations

import logging
import random
import socket
import traceback
import uuid

import pytest

from vault.connectors import (
    AuthenticationFailed,
    ConnectorError,
    DiskInfo,
    NotFound,
    OperationFailed,
    Unreachable,
    UntrustedCertificate,
    VmInfo,
    open_connector,
    probe_certificate,
)
from vault.connectors.vsphere import VSphereConnector

pytestmark = pytest.mark.peer


def expected_vms(dump: dict) -> set[VmInfo]:
    """What discovery must report for vcsim's inventory dump: every VM but the templates."""
    return {
        VmInfo(
            instance_uuid=vm["instance_uuid"],
            name=vm["name"],
            power_state=vm["power_state"],
            guest_os=vm["guest_id"],
            host=vm["host"],
            datacenter=vm["datacenter"],
            cluster=vm["cluster"],
            disks=tuple(sorted(
                (DiskInfo(key=d["key"], label=d["label"], capacity_bytes=d["capacity_bytes"],
                          backing_file=d["backing_file"], datastore=d["datastore"]) for d in vm["disks"]),
                key=lambda d: d.key,
            )),
        )
        for vm in dump["vms"]
        if not vm["template"]
    }


def assert_discovery_matches(inventory, dump, context: str = "") -> None:
    assert set(inventory.vms) == expected_vms(dump), context
    assert len(inventory.vms) == len(expected_vms(dump)), context
    assert list(inventory.datacenters) == sorted(dump["datacenters"]), context
    assert list(inventory.clusters) == sorted(dump["clusters"]), context
    assert list(inventory.hosts) == sorted(dump["hosts"]), context
    assert list(inventory.datastores) == sorted(dump["datastores"]), context


def vm_named(server, name: str) -> dict:
    return next(vm for vm in server.inventory["vms"] if vm["name"] == name)


@pytest.fixture(scope="module")
def connector(vcsim):
    with vcsim.connector() as conn:
        yield conn


# --- discovery ---------------------------------------------------------------------------


def test_discovery_matches_vcsim_including_templates_orphans_and_missing_guest(vcsim_factory):
    server = vcsim_factory(dc=2, cluster=2, host=2, standalone_host=1, vm=2, ds=2, templates=1, orphans=1, no_guest=1)
    dump = server.inventory
    assert len(dump["vms"]) == 2 * (2 * 2 + 1 * 2)
    with server.connector() as conn:
        inventory = conn.discover()
    assert_discovery_matches(inventory, dump)
    # vcsim's defaults report disk sizes in KB only; the quirks are really there
    assert all(d["capacity_in_bytes"] == 0 for vm in dump["vms"] for d in vm["disks"])
    template = next(vm for vm in dump["vms"] if vm["template"])
    assert template["instance_uuid"] not in {v.instance_uuid for v in inventory.vms}
    assert any(v.host == "" and v.cluster == "" and v.datacenter for v in inventory.vms)
    assert any(v.guest_os == "" for v in inventory.vms)
    assert {v.power_state for v in inventory.vms} <= {"poweredOn", "poweredOff", "suspended"}


def test_discovery_of_a_random_inventory(vcsim_factory):
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    flags = dict(dc=rng.randint(1, 2), cluster=rng.randint(0, 2), host=rng.randint(1, 3),
                 standalone_host=rng.randint(0, 2), vm=rng.randint(0, 3), ds=rng.randint(1, 3),
                 autostart=rng.choice([True, False]))
    if flags["cluster"] == 0 and flags["standalone_host"] == 0:
        flags["standalone_host"] = 1
    server = vcsim_factory(**flags)
    with server.connector() as conn:
        assert_discovery_matches(conn.discover(), server.inventory, f"seed {seed}, flags {flags}")


def test_discovery_follows_the_servers_pages(vcsim_factory):
    server = vcsim_factory(cluster=2, host=2, standalone_host=2, vm=3, max_page=3)
    with server.connector() as conn:
        before = conn.round_trips
        inventory = conn.discover()
        calls = conn.round_trips - before
    assert_discovery_matches(inventory, server.inventory)
    objects = len(server.inventory["vms"]) + len(server.inventory["hosts"])
    assert calls >= objects // 3  # one ContinueRetrievePropertiesEx per page of 3


def test_discovery_of_1000_vms_takes_a_handful_of_round_trips(vcsim_factory):
    server = vcsim_factory(cluster=5, host=2, standalone_host=0, vm=200)
    with server.connector() as conn:
        before = conn.round_trips
        inventory = conn.discover()
        calls = conn.round_trips - before
    assert len(inventory.vms) == 1000
    assert_discovery_matches(inventory, server.inventory)
    assert calls <= 10


def test_get_vm_matches_discovery(connector, vcsim):
    expected = {v.instance_uuid: v for v in expected_vms(vcsim.live_inventory())}
    some = sorted(expected)[0]
    assert connector.get_vm(some) == expected[some]
    with pytest.raises(NotFound, match="No VM with instance UUID"):
        connector.get_vm(str(uuid.uuid4()))


def test_about(connector):
    info = connector.about()
    assert info.api_type == "VirtualCenter"
    assert info.version and info.name and info.instance_uuid


def test_a_session_the_server_ended_is_renewed(vcsim):
    with vcsim.connector() as conn:
        conn.content.sessionManager.Logout()  # as if the session had timed out on the server
        assert conn.discover().vms
        assert conn.content.sessionManager.currentSession is not None


# --- connection errors -------------------------------------------------------------------


@pytest.fixture
def secret_vcsim(vcsim_factory):
    return vcsim_factory(password="Lifeboat-S3cret-pw")


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


def test_wrong_password_is_a_clear_error_without_the_password(secret_vcsim, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "Wrong-Pa55word-typed"
    conn = secret_vcsim.connector(password=wrong)
    with pytest.raises(AuthenticationFailed) as excinfo:
        conn.connect()
    port = secret_vcsim.port
    assert str(excinfo.value) == f"vCenter 127.0.0.1:{port} rejected the user name or password"
    everything = "".join(traceback.format_exception(excinfo.value)) + repr(conn) + caplog.text
    assert_no_secret(everything, wrong, secret_vcsim.password)
    # the right password works, and logging a session leaks nothing either
    with secret_vcsim.connector() as ok:
        ok.discover()
    assert_no_secret(caplog.text + repr(ok), secret_vcsim.password)
    assert "Connected to" in caplog.text


def test_unreachable_host(free_port, caplog):
    caplog.set_level(logging.DEBUG)
    conn = VSphereConnector(host="127.0.0.1", port=free_port, user="u", password="Unreachable-pw")
    with pytest.raises(Unreachable, match=f"Cannot reach vCenter 127.0.0.1:{free_port}: connection refused"):
        conn.connect()
    assert "Unreachable-pw" not in caplog.text


def test_server_that_does_not_answer_times_out():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the TCP connection, never speaks TLS
        port = listener.getsockname()[1]
        conn = VSphereConnector(host="127.0.0.1", port=port, user="u", password="p", timeout=0.5)
        with pytest.raises(Unreachable, match="timed out"):
            conn.connect()


def test_untrusted_certificate_carries_its_thumbprints(secret_vcsim, caplog):
    caplog.set_level(logging.DEBUG)
    conn = secret_vcsim.connector(ca_file=None)  # the system trust store does not know vcsim's CA
    with pytest.raises(UntrustedCertificate) as excinfo:
        conn.connect()
    err = excinfo.value
    assert err.thumbprint_sha1 == secret_vcsim.thumbprint_sha1
    assert err.thumbprint_sha256 == secret_vcsim.thumbprint_sha256
    assert secret_vcsim.thumbprint_sha1 in str(err) and "not trusted" in str(err)
    assert probe_certificate(secret_vcsim.host, secret_vcsim.port) == (
        secret_vcsim.thumbprint_sha1, secret_vcsim.thumbprint_sha256)
    assert_no_secret(str(err) + caplog.text, secret_vcsim.password)


@pytest.mark.parametrize("which", ["thumbprint_sha1", "thumbprint_sha256"])
def test_pinned_thumbprint_is_accepted(secret_vcsim, which):
    with secret_vcsim.connector(ca_file=None, thumbprint=getattr(secret_vcsim, which)) as conn:
        assert conn.discover().vms


def test_a_different_pinned_thumbprint_is_refused(secret_vcsim):
    conn = secret_vcsim.connector(ca_file=None, thumbprint="AB:" * 31 + "AB")
    with pytest.raises(UntrustedCertificate, match="not the trusted one") as excinfo:
        conn.connect()
    assert excinfo.value.thumbprint_sha256 == secret_vcsim.thumbprint_sha256


def test_allow_untrusted_accepts_any_certificate(secret_vcsim):
    with secret_vcsim.connector(ca_file=None, allow_untrusted=True) as conn:
        assert conn.discover().vms


def test_open_connector_vcenter(secret_vcsim):
    conn = open_connector("vcenter", host=secret_vcsim.host, port=secret_vcsim.port, user=secret_vcsim.user,
                          password=secret_vcsim.password, thumbprint=secret_vcsim.thumbprint_sha256)
    assert isinstance(conn, VSphereConnector)
    with conn:
        assert conn.about().api_type == "VirtualCenter"
    with pytest.raises(ValueError):
        open_connector("hyperv")


# --- operations --------------------------------------------------------------------------


def test_quiesced_snapshot_appears_in_the_snapshot_tree_and_is_removed(connector, vcsim):
    vm_uuid = vm_named(vcsim, "DC0_H0_VM0")["instance_uuid"]
    snap = connector.create_quiesced_snapshot(vm_uuid, "lifeboat-app-1")
    assert snap.quiesced and snap.name == "lifeboat-app-1" and snap.created.tzinfo is not None
    assert vcsim.live_vm(vm_uuid)["snapshots"] == [{"id": snap.id, "name": "lifeboat-app-1", "quiesced": True}]
    second = connector.create_quiesced_snapshot(vm_uuid, "lifeboat-app-2")
    assert [s.id for s in connector.list_snapshots(vm_uuid)] == [snap.id, second.id]

    connector.remove_snapshot(vm_uuid, snap.id)
    assert [s["id"] for s in vcsim.live_vm(vm_uuid)["snapshots"]] == [second.id]
    connector.remove_snapshot(vm_uuid, second.id)
    assert vcsim.live_vm(vm_uuid)["snapshots"] == []
    assert connector.list_snapshots(vm_uuid) == []
    with pytest.raises(NotFound, match="has no snapshot"):
        connector.remove_snapshot(vm_uuid, second.id)


def test_power_off_on_and_guest_shutdown_show_in_vcsim(connector, vcsim):
    vm_uuid = vm_named(vcsim, "DC0_H0_VM1")["instance_uuid"]
    assert vcsim.live_vm(vm_uuid)["power_state"] == "poweredOn"
    connector.power_off(vm_uuid)
    assert vcsim.live_vm(vm_uuid)["power_state"] == "poweredOff"
    connector.power_off(vm_uuid)  # already off: nothing to do
    connector.shutdown_guest(vm_uuid)  # likewise
    connector.power_on(vm_uuid)
    assert vcsim.live_vm(vm_uuid)["power_state"] == "poweredOn"
    connector.power_on(vm_uuid)
    connector.shutdown_guest(vm_uuid)
    assert vcsim.live_vm(vm_uuid)["power_state"] == "poweredOff"
    connector.power_on(vm_uuid)
    assert connector.get_vm(vm_uuid).power_state == "poweredOn"


def test_recent_events_are_the_vms_newest_first(connector, vcsim):
    vm_uuid = vm_named(vcsim, "DC0_C0_RP0_VM0")["instance_uuid"]
    connector.power_off(vm_uuid)
    connector.power_on(vm_uuid)
    events = connector.recent_events(vm_uuid, limit=3)
    assert len(events) == 3
    assert [e.time for e in events] == sorted((e.time for e in events), reverse=True)
    assert events[0].type == "VmPoweredOnEvent"
    assert "VmPoweredOffEvent" in {e.type for e in connector.recent_events(vm_uuid)}
    assert all(e.message and e.time.tzinfo is not None for e in events)
    assert "DC0_C0_RP0_VM0" in events[0].message


def test_create_vm_makes_a_vm_with_its_disks_and_destroy_removes_it(connector, vcsim):
    sizes = [8 * 2**20, 2**30, 64 * 2**20]
    created = connector.create_vm(name="lifeboat-replica-1", host="DC0_C0_H1", datastore="LocalDS_0",
                                  disk_capacities_bytes=sizes, guest_os="ubuntu64Guest")
    assert created.name == "lifeboat-replica-1" and created.power_state == "poweredOff"
    assert (created.host, created.cluster, created.datacenter) == ("DC0_C0_H1", "DC0_C0", "DC0")
    assert [d.capacity_bytes for d in created.disks] == sizes
    live = vcsim.live_vm(created.instance_uuid)
    assert live is not None and live["guest_id"] == "ubuntu64Guest" and live["host"] == "DC0_C0_H1"
    assert [d["capacity_bytes"] for d in live["disks"]] == sizes
    assert [d["backing_file"] for d in live["disks"]] == [d.backing_file for d in created.disks]
    assert all(d["datastore"] == "LocalDS_0" and d["backing_file"].startswith("[LocalDS_0] ") for d in live["disks"])
    assert created in connector.discover().vms

    connector.power_on(created.instance_uuid)
    connector.destroy_vm(created.instance_uuid)  # powers it off first
    assert vcsim.live_vm(created.instance_uuid) is None
    with pytest.raises(NotFound):
        connector.destroy_vm(created.instance_uuid)


def test_create_vm_with_more_disks_than_one_controller_holds(connector, vcsim):
    sizes = [(i + 1) * 2**20 for i in range(17)]
    created = connector.create_vm(name="lifeboat-many-disks", host="DC0_H0", datastore="LocalDS_0",
                                  disk_capacities_bytes=sizes)
    try:
        assert [d.capacity_bytes for d in created.disks] == sizes
        assert len(vcsim.live_vm(created.instance_uuid)["disks"]) == 17
    finally:
        connector.destroy_vm(created.instance_uuid)


def test_create_vm_names_what_is_missing(connector):
    with pytest.raises(NotFound, match="has no host NoSuchHost"):
        connector.create_vm(name="x", host="NoSuchHost", datastore="LocalDS_0", disk_capacities_bytes=[2**20])
    with pytest.raises(NotFound, match="host DC0_H0 has no datastore NoSuchDS"):
        connector.create_vm(name="x", host="DC0_H0", datastore="NoSuchDS", disk_capacities_bytes=[2**20])
    with pytest.raises(NotFound, match="in datacenter DC9"):
        connector.create_vm(name="x", host="DC0_H0", datastore="LocalDS_0", disk_capacities_bytes=[2**20],
                            datacenter="DC9")
    with pytest.raises(ValueError, match="multiple of 512"):
        connector.create_vm(name="x", host="DC0_H0", datastore="LocalDS_0", disk_capacities_bytes=[1000])


def test_unknown_vm_is_not_found_everywhere(connector):
    missing = str(uuid.uuid4())
    for call in (
        lambda: connector.power_on(missing),
        lambda: connector.power_off(missing),
        lambda: connector.shutdown_guest(missing),
        lambda: connector.create_quiesced_snapshot(missing, "s"),
        lambda: connector.list_snapshots(missing),
        lambda: connector.remove_snapshot(missing, "snapshot-1"),
        lambda: connector.destroy_vm(missing),
        lambda: connector.recent_events(missing),
    ):
        with pytest.raises(NotFound, match=f"No VM with instance UUID {missing} on vCenter 127.0.0.1:"):
            call()


def test_a_refused_operation_says_why(vcsim_factory):
    server = vcsim_factory(templates=1)
    template = next(vm for vm in server.inventory["vms"] if vm["template"])
    with server.connector() as conn:
        with pytest.raises(OperationFailed) as excinfo:
            conn.power_on(template["instance_uuid"])
    assert str(excinfo.value) == f"Powering on VM {template['instance_uuid']} failed: cannot powerOn a template"
    assert isinstance(excinfo.value, ConnectorError)


def test_a_failed_task_says_why(vcsim_factory):
    server = vcsim_factory(busy=1)
    busy = next(vm for vm in server.inventory["vms"] if vm["busy"])
    with server.connector() as conn:
        with pytest.raises(OperationFailed) as excinfo:
            conn.power_off(busy["instance_uuid"])
        assert str(excinfo.value) == (f"Powering off VM {busy['instance_uuid']} failed: "
                                      "Another task is already in progress on this virtual machine")
        with pytest.raises(OperationFailed, match="Deleting VM .* failed: Another task is already in progress"):
            conn.destroy_vm(busy["instance_uuid"])
    assert server.live_vm(busy["instance_uuid"])["power_state"] == "poweredOn"
