"""The configuration server's side of the agent and process-server protocols."""
from __future__ import annotations

import uuid

import pytest
from rest_framework.test import APIClient

from replication.agents import item_token, process_server_token
from replication.models import MobilityAgent, ProtectedItem, ReplicaDisk
from tests.factories import PolicyFactory, ProcessServerFactory, VaultFactory
from vault.models import DiscoveredMachine

PASS = "correct horse battery staple"


@pytest.fixture
def anon():
    return APIClient()


def _body(**overrides):
    body = {
        "passphrase": PASS, "hostname": "files-01.corp",
        "machine": {"name": "files-01", "os": "Ubuntu 24.04", "disks": [
            {"key": 0, "path": "/dev/sda", "capacity_bytes": 8 * 1024 * 1024},
            {"key": 1, "path": "/dev/sdb", "capacity_bytes": 4 * 1024 * 1024},
        ]},
    }
    body.update(overrides)
    return body


def _register(anon, **overrides):
    return anon.post("/api/v1/agents/register", _body(**overrides), format="json")


def test_agent_registers_a_physical_machine_and_gets_its_assignment(db, anon):
    vault = VaultFactory(passphrase=PASS)
    r = _register(anon)
    assert r.status_code == 201, r.content
    agent_id, token = r.json()["agent_id"], r.json()["token"]
    machine = DiscoveredMachine.objects.get(vault=vault, name="files-01")
    assert machine.source == "agent" and machine.vcenter is None
    assert sorted((d.key, d.backing_file, d.capacity_bytes) for d in machine.disks.all()) == [
        (0, "/dev/sda", 8 * 1024 * 1024), (1, "/dev/sdb", 4 * 1024 * 1024)]

    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    assert anon.get(f"/api/v1/agents/{agent_id}/assignment", **auth).json() == {"items": []}

    # Protect it: once replica disks exist and the process server is known, the agent sees it.
    ps = ProcessServerFactory(vault=vault, thumbprint="ab" * 32)
    item = ProtectedItem.objects.create(vault=vault, machine=machine, policy=PolicyFactory(vault=vault), process_server=ps, name="files-01")
    for i, d in enumerate(machine.disks.order_by("key")):
        ReplicaDisk.objects.create(item=item, index=i, source_disk_key=d.key, capacity_bytes=d.capacity_bytes, storage_name=f"x{i}", source_path=d.backing_file)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="INITIAL_REPLICATION")
    items = anon.get(f"/api/v1/agents/{agent_id}/assignment", **auth).json()["items"]
    assert len(items) == 1
    assert items[0]["item_token"] == item_token(item=item)
    assert items[0]["process_server_url"] == f"https://127.0.0.1:{ps.data_port}"
    assert [d["path"] for d in items[0]["disks"]] == ["/dev/sda", "/dev/sdb"]

    # Heartbeat with the item's progress and backlog.
    hb = anon.post(f"/api/v1/agents/{agent_id}/heartbeat", {"items": [
        {"item_id": str(item.pk), "phase": "initial", "progress": 0.42, "acked_seq": 7, "backlog_bytes": 12345}]}, format="json", **auth)
    assert hb.status_code == 204
    item.refresh_from_db()
    assert (item.initial_replication_progress, item.acked_seq, item.agent_backlog_bytes) == (42, 7, 12345)
    assert item.agent_last_heartbeat_at is not None

    # The agent reports that a gap can no longer be bridged.
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="PROTECTED")
    ev = anon.post(f"/api/v1/agents/{agent_id}/events", {"item_id": str(item.pk), "kind": "resync_required", "message": "journal overflowed"}, format="json", **auth)
    assert ev.status_code == 204
    item.refresh_from_db()
    assert item.protection_state == "RESYNC_REQUIRED" and "journal overflowed" in item.last_error


def test_the_agent_registers_again_with_its_token(db, anon):
    VaultFactory(passphrase=PASS)
    first = _register(anon).json()
    second = anon.post("/api/v1/agents/register", {**_body(), "machine": {**_body()["machine"], "disks": [
        {"key": 0, "path": "/dev/sda", "capacity_bytes": 8 * 1024 * 1024}]}}, format="json",
        HTTP_AUTHORIZATION=f"Bearer {first['token']}")
    assert second.status_code == 201, second.content
    assert second.json() == first  # the same agent, the same token
    assert MobilityAgent.objects.count() == 1 and DiscoveredMachine.objects.count() == 1
    assert [d.key for d in DiscoveredMachine.objects.get().disks.all()] == [0]  # its disks as it says now


@pytest.mark.parametrize("override,status,code", [
    ({"passphrase": "not the passphrase at all"}, 403, "bad_passphrase"),
    ({"machine": {"name": "x", "disks": []}}, 400, "invalid"),
    ({"machine": {"name": "x", "disks": [{"key": 0, "path": "/dev/sda", "capacity_bytes": 1000}]}}, 400, "invalid"),
    ({"hostname": ""}, 400, "invalid"),
])
def test_bad_registrations_are_refused_and_change_nothing(db, anon, override, status, code):
    VaultFactory(passphrase=PASS)
    r = _register(anon, **override)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert not MobilityAgent.objects.exists() and not DiscoveredMachine.objects.exists()


def test_agent_endpoints_need_the_agents_own_token(db, anon):
    VaultFactory(passphrase=PASS)
    a = _register(anon).json()
    b = _register(anon, hostname="other", machine={"name": "other", "disks": [{"key": 0, "path": "/dev/sda", "capacity_bytes": 512}]}).json()
    assert anon.get(f"/api/v1/agents/{a['agent_id']}/assignment").status_code == 403
    assert anon.get(f"/api/v1/agents/{a['agent_id']}/assignment", HTTP_AUTHORIZATION=f"Bearer {b['token']}").status_code == 403
    assert anon.get(f"/api/v1/agents/{uuid.uuid4()}/assignment", HTTP_AUTHORIZATION=f"Bearer {a['token']}").status_code == 403
    assert anon.post(f"/api/v1/agents/{a['agent_id']}/events", {"item_id": str(uuid.uuid4()), "kind": "resync_required"},
                     format="json", HTTP_AUTHORIZATION=f"Bearer {a['token']}").status_code == 404


def test_process_server_heartbeat(db, anon):
    vault = VaultFactory()
    ps = ProcessServerFactory(vault=vault)
    body = {"thumbprint": "cd" * 32, "cpu_percent": 12.5, "memory_percent": 40.0, "cache_free_bytes": 10, "cache_total_bytes": 100,
            "pending_upload_bytes": 5, "items": {}}
    assert anon.post(f"/api/v1/processServers/{ps.pk}/heartbeat", body, format="json", HTTP_AUTHORIZATION="Bearer nope").status_code == 403
    r = anon.post(f"/api/v1/processServers/{ps.pk}/heartbeat", body, format="json", HTTP_AUTHORIZATION=f"Bearer {process_server_token(server=ps)}")
    assert r.status_code == 200
    assert r.json() == {"token_generations": {}}  # no item token was ever rotated
    ps.refresh_from_db()
    assert (ps.thumbprint, ps.cpu_percent, ps.cache_total_bytes) == ("cd" * 32, 12.5, 100) and ps.last_heartbeat_at
    bad = anon.post(f"/api/v1/processServers/{ps.pk}/heartbeat", {"cpu_percent": 250}, format="json", HTTP_AUTHORIZATION=f"Bearer {process_server_token(server=ps)}")
    assert bad.status_code == 400


def test_process_server_configuration_is_never_for_readers(db, api, viewer_user):
    from tests.conftest import grant_role

    ps = ProcessServerFactory()
    config = api.get(f"/api/v1/processServers/{ps.pk}/configuration").json()
    assert config["listen"] == f"127.0.0.1:{ps.data_port}" and config["seal_key"] and config["auth_key"]
    viewer = APIClient()
    viewer.force_authenticate(viewer_user)
    assert viewer.get(f"/api/v1/processServers/{ps.pk}/configuration").status_code == 404  # no role: not there
    grant_role(viewer_user, ps.vault, "READER")
    refused = viewer.get(f"/api/v1/processServers/{ps.pk}/configuration")
    assert refused.status_code == 403 and "Reader" in refused.json()["error"]["message"]
