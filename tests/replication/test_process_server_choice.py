"""Which process server an item goes to (the least loaded when none is named) and the
"Switch process server" operation's API: what it refuses, its job, and the agent's
assignment leaving the item out while the old server drains."""
from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from core.choices import JobState, JobType
from core.models import Job
from replication.agents import agent_assignment
from replication.choices import ProtectionState as P
from replication.models import MobilityAgent, ProtectedItem
from tests.conftest import grant_role
from tests.factories import (
    DiskFactory,
    MachineFactory,
    PolicyFactory,
    ProcessServerFactory,
    ProtectedItemFactory,
    ReplicaDiskFactory,
    VaultFactory,
)

ITEMS = "/api/v1/replicationProtectedItems"
THUMB = "ab" * 32


@pytest.fixture
def vault(db):
    return VaultFactory()


def _enable(api, vault, policy, machine, **extra):
    return api.post(f"{ITEMS}/", {"vault": vault.pk, "machine": machine.pk, "policy": policy.pk, **extra}, format="json")


def test_enabling_without_a_process_server_spreads_items_over_the_least_loaded(api, vault):
    policy = PolicyFactory(vault=vault)
    busy = ProcessServerFactory(vault=vault, name="ps-a", thumbprint=THUMB)
    ProcessServerFactory(vault=vault, name="ps-b", thumbprint=THUMB)
    ProcessServerFactory(vault=vault, name="ps-0-never-started")  # fewest items, but no agent could pin it
    ProcessServerFactory(vault=vault, name="ps-0-recovery", site="RECOVERY", thumbprint=THUMB)  # failback's side
    ProtectedItemFactory(vault=vault, policy=policy, process_server=busy)
    chosen = []
    for _ in range(3):
        machine = MachineFactory(vault=vault)
        DiskFactory(machine=machine)
        r = _enable(api, vault, policy, machine)
        assert r.status_code == 202, r.content
        chosen.append(ProtectedItem.objects.get(machine=machine).process_server.name)
    assert chosen == ["ps-b", "ps-a", "ps-b"]  # fewest items first, ties by name
    named = MachineFactory(vault=vault)
    assert _enable(api, vault, policy, named, process_server=busy.pk).status_code == 202
    assert ProtectedItem.objects.get(machine=named).process_server == busy  # as the admin picked


def test_enabling_in_a_vault_without_process_servers_says_what_to_do(api, vault):
    r = _enable(api, vault, PolicyFactory(vault=vault), MachineFactory(vault=vault))
    assert r.status_code == 400
    assert "has no process server" in r.json()["error"]["message"] and "add one" in r.json()["error"]["message"]


@pytest.fixture
def protected(vault):
    old = ProcessServerFactory(vault=vault, name="ps-old", thumbprint=THUMB)
    item = ProtectedItemFactory(vault=vault, process_server=old, protection_state=P.PROTECTED)
    ReplicaDiskFactory(item=item, source_path="/dev/sdb")
    MobilityAgent.objects.create(vault=vault, machine=item.machine, hostname=item.name)
    return item


def test_switch_process_server_starts_a_job_and_pauses_the_items_shipping(api, vault, protected):
    agent = MobilityAgent.objects.get(machine=protected.machine)
    new = ProcessServerFactory(vault=vault, name="ps-new", thumbprint="cd" * 32)
    assert [i["process_server_url"] for i in agent_assignment(agent=agent)["items"]] == [protected.process_server.url]
    r = api.post(f"{ITEMS}/{protected.pk}/changeProcessServer/", {"process_server": new.pk}, format="json")
    assert r.status_code == 202, r.content
    assert r["Location"].rstrip("/").endswith(f"/api/v1/replicationJobs/{r.data['id']}")
    job = Job.objects.get(pk=r.data["id"])
    assert job.type == JobType.CHANGE_PROCESS_SERVER and job.params == {"process_server": new.pk,
                                                                         "from": protected.process_server_id}
    assert [s["name"] for s in job.steps] == ["Check the new process server", "Pause shipping",
                                             "Drain the old process server", "Switch", "Resume shipping"]
    # While the old server drains, the agent is told nothing of the item: it stops sending.
    assert agent_assignment(agent=agent)["items"] == []
    # Once the item is on the new server, the agent sends there (the job still confirming).
    ProtectedItem.objects.filter(pk=protected.pk).update(process_server=new)
    assert [i["process_server_url"] for i in agent_assignment(agent=agent)["items"]] == [new.url]
    # A job that failed before the switch leaves the item where it was, shipping again.
    ProtectedItem.objects.filter(pk=protected.pk).update(process_server=protected.process_server)
    Job.objects.filter(pk=job.pk).update(state=JobState.FAILED)
    assert [i["process_server_url"] for i in agent_assignment(agent=agent)["items"]] == [protected.process_server.url]


def test_switch_process_server_refuses_what_it_cannot_do(api, vault, protected):
    url = f"{ITEMS}/{protected.pk}/changeProcessServer/"
    same = api.post(url, {"process_server": protected.process_server_id}, format="json")
    assert same.status_code == 400 and "already replicates through ps-old" in same.json()["error"]["message"]
    elsewhere = ProcessServerFactory(thumbprint=THUMB)  # another vault's
    assert "another vault" in api.post(url, {"process_server": elsewhere.pk}, format="json").json()["error"]["message"]
    silent = ProcessServerFactory(vault=vault, name="ps-silent")
    r = api.post(url, {"process_server": silent.pk}, format="json")
    assert r.status_code == 400 and "has never reported" in r.json()["error"]["message"]
    recovery = ProcessServerFactory(vault=vault, name="ps-recovery", site="RECOVERY", thumbprint=THUMB)
    r = api.post(url, {"process_server": recovery.pk}, format="json")
    assert r.status_code == 400 and "recovery site" in r.json()["error"]["message"]
    assert api.post(url, {}, format="json").status_code == 400
    new = ProcessServerFactory(vault=vault, name="ps-new", thumbprint=THUMB)
    ProtectedItem.objects.filter(pk=protected.pk).update(protection_state=P.RESYNCING)
    r = api.post(url, {"process_server": new.pk}, format="json")
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"
    assert "Only a protected item switches process server" in r.json()["error"]["message"]
    ProtectedItem.objects.filter(pk=protected.pk).update(protection_state=P.PROTECTED)
    assert api.post(url, {"process_server": new.pk}, format="json").status_code == 202
    twice = api.post(url, {"process_server": new.pk}, format="json")
    assert twice.status_code == 409 and "switching process server already" in twice.json()["error"]["message"]
    assert Job.objects.filter(type=JobType.CHANGE_PROCESS_SERVER).count() == 1


def test_a_reader_cannot_switch_process_server(vault, protected, viewer_user):
    new = ProcessServerFactory(vault=vault, name="ps-new", thumbprint=THUMB)
    grant_role(viewer_user, vault, "READER")
    client = APIClient()
    client.force_authenticate(viewer_user)
    r = client.post(f"{ITEMS}/{protected.pk}/changeProcessServer/", {"process_server": new.pk}, format="json")
    assert r.status_code == 403
    assert not Job.objects.filter(type=JobType.CHANGE_PROCESS_SERVER).exists()
