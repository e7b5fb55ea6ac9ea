"""Agents cannot impersonate (issue 16 part 3): registering as a machine that has an agent
takes that agent's token or an administrator's approval; agent and item tokens carry a
generation, and revoking or rotating one makes the older ones useless."""
from __future__ import annotations

import uuid

import pytest
from rest_framework.test import APIClient

from replication.agents import MAX_PENDING_PER_MACHINE
from replication.dataplane.auth import REVOKED, VALID, check_token, issue_token, item_subject, token_generation
from replication.models import AgentRegistration, MobilityAgent, ProtectedItem, ReplicaDisk
from replication.tokens import item_token
from tests.conftest import grant_role
from tests.factories import PolicyFactory, ProcessServerFactory, VaultFactory
from vault.models import DiscoveredMachine, Event
from vault.services import vault_keys

PASS = "correct horse battery staple"
APPROVAL = "waiting for an administrator's approval in the portal"


def _body(hostname="files-01.corp", disks=(("/dev/sda", 8),), **machine):
    return {"passphrase": PASS, "hostname": hostname, "version": "1.0", "machine": {
        "name": "files-01", "instance_uuid": "4201-files-01", **machine,
        "disks": [{"key": k, "path": p, "capacity_bytes": mib * 1024 * 1024} for k, (p, mib) in enumerate(disks)]}}


def _register(client, token=None, **kw):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return client.post("/api/v1/agents/register", _body(**kw), format="json", **headers)


def _bearer(token):
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


@pytest.fixture
def anon():
    return APIClient()


@pytest.fixture
def protected(db, anon):
    """A registered agent whose machine is protected (an item with a replica disk, its process
    server's certificate known): (vault, agent id, agent token, item)."""
    vault = VaultFactory(passphrase=PASS)
    first = _register(anon)
    assert first.status_code == 201, first.content
    machine = DiscoveredMachine.objects.get(vault=vault, instance_uuid="4201-files-01")
    ps = ProcessServerFactory(vault=vault, thumbprint="ab" * 32)
    item = ProtectedItem.objects.create(vault=vault, machine=machine, policy=PolicyFactory(vault=vault), process_server=ps,
                                        name="files-01")
    ReplicaDisk.objects.create(item=item, index=0, source_disk_key=0, capacity_bytes=8 * 1024 * 1024, storage_name="x0",
                               source_path="/dev/sda")
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="PROTECTED")
    return vault, first.json()["agent_id"], first.json()["token"], item


def _assignment(client, agent_id, token):
    return client.get(f"/api/v1/agents/{agent_id}/assignment", **_bearer(token))


# --- registering as a machine that has an agent ------------------------------------------------


def test_a_second_registration_without_the_token_waits_and_changes_nothing(protected, anon):
    vault, agent_id, token, item = protected
    r = _register(anon, hostname="intruder.corp", disks=(("/etc/shadow", 1),))
    assert r.status_code == 202, r.content
    body = r.json()
    assert body["status"] == "pending" and APPROVAL in body["message"]
    assert "token" not in body and "agent_id" not in body and body["poll_token"].startswith("lbr_")
    registration = AgentRegistration.objects.get(pk=body["registration_id"])
    assert (registration.state, registration.hostname, registration.remote_addr) == ("PENDING", "intruder.corp", "127.0.0.1")
    assert registration.poll_digest != body["poll_token"]  # only its digest is kept
    # The machine and its agent are untouched; the agent goes on.
    machine = DiscoveredMachine.objects.get(pk=item.machine_id)
    assert machine.host == "files-01.corp" and [d.backing_file for d in machine.disks.all()] == ["/dev/sda"]
    agent = MobilityAgent.objects.get(pk=agent_id)
    assert agent.hostname == "files-01.corp" and agent.token_generation == 0
    assert _assignment(anon, agent_id, token).status_code == 200
    assert Event.objects.filter(kind="agent_registration_pending", message__contains="intruder.corp").exists()
    # Polling: pending (202) with the right secret; one 404 for a wrong secret or an unknown id.
    poll = anon.get(f"/api/v1/agents/registrations/{registration.pk}", **_bearer(body["poll_token"]))
    assert poll.status_code == 202 and poll.json()["status"] == "pending" and APPROVAL in poll.json()["message"]
    for wrong in (anon.get(f"/api/v1/agents/registrations/{registration.pk}", **_bearer("lbr_" + "x" * 43)),
                  anon.get(f"/api/v1/agents/registrations/{uuid.uuid4()}", **_bearer(body["poll_token"]))):
        assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "unknown_registration"
    # A token of another agent is no better than none.
    other = _register(anon, hostname="other", instance_uuid="4201-other").json()
    assert _register(anon, token=other["token"]).status_code == 202


def test_approval_hands_over_the_machine_and_revokes_the_old_tokens(protected, anon, api):
    vault, agent_id, old_token, item = protected
    old_item_token = _assignment(anon, agent_id, old_token).json()["items"][0]["item_token"]
    pending = _register(anon, hostname="files-01-reinstalled", disks=(("/dev/vda", 8),)).json()

    r = api.post(f"/api/v1/agentRegistrations/{pending['registration_id']}/approve")
    assert r.status_code == 200, r.content
    assert r.json()["state"] == "APPROVED" and r.json()["decided_by"] == "admin"
    # The old agent's token is refused, with a sentence that says why.
    refused = _assignment(anon, agent_id, old_token)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "token_revoked"
    assert "register the agent again" in refused.json()["error"]["message"]
    # The registering agent's poll now gives the credentials: the same agent id, a new token.
    poll = anon.get(f"/api/v1/agents/registrations/{pending['registration_id']}", **_bearer(pending["poll_token"]))
    assert poll.status_code == 200, poll.content
    assert poll.json()["agent_id"] == agent_id and poll.json()["token"] != old_token
    new_token = poll.json()["token"]
    assert token_generation(new_token) == 1
    items = _assignment(anon, agent_id, new_token).json()["items"]
    # The machine is the registration's now, and the item's token moved on a generation.
    machine = DiscoveredMachine.objects.get(pk=item.machine_id)
    assert machine.host == "files-01-reinstalled" and [d.backing_file for d in machine.disks.all()] == ["/dev/vda"]
    item.refresh_from_db()
    assert item.token_generation == 1 and items[0]["item_token"] == item_token(item=item) != old_item_token
    auth_key = vault_keys(vault=vault)[1]
    assert check_token(auth_key, old_item_token, item_subject(item.pk), min_generation=1) == REVOKED
    assert check_token(auth_key, items[0]["item_token"], item_subject(item.pk), min_generation=1) == VALID
    # Deciding twice is a 409 with the state it is in; the agent re-registers with its new token.
    again = api.post(f"/api/v1/agentRegistrations/{pending['registration_id']}/reject")
    assert again.status_code == 409 and again.json()["error"]["current_state"] == "APPROVED"
    assert _register(anon, token=new_token, hostname="files-01-reinstalled", disks=(("/dev/vda", 8),)).status_code == 201


def test_a_rejected_registration_gets_nothing(protected, anon, api):
    _vault, agent_id, token, _item = protected
    pending = _register(anon, hostname="intruder").json()
    r = api.post(f"/api/v1/agentRegistrations/{pending['registration_id']}/reject")
    assert r.status_code == 200 and r.json()["state"] == "REJECTED"
    poll = anon.get(f"/api/v1/agents/registrations/{pending['registration_id']}", **_bearer(pending["poll_token"]))
    assert poll.status_code == 403 and poll.json()["error"]["code"] == "registration_rejected"
    assert "register again" in poll.json()["error"]["message"]
    assert api.post(f"/api/v1/agentRegistrations/{pending['registration_id']}/approve").status_code == 409
    assert _assignment(anon, agent_id, token).status_code == 200  # the agent never noticed
    assert MobilityAgent.objects.get(pk=agent_id).hostname == "files-01.corp"


def test_pending_registrations_per_machine_are_limited(protected, anon):
    for n in range(MAX_PENDING_PER_MACHINE):
        assert _register(anon, hostname=f"knock-{n}").status_code == 202
    r = _register(anon, hostname="one-more")
    assert r.status_code == 409 and r.json()["error"]["code"] == "too_many_pending"
    assert AgentRegistration.objects.count() == MAX_PENDING_PER_MACHINE


def test_only_an_administrator_of_the_vault_decides(protected, anon, viewer_user, django_user_model):
    vault, _agent_id, _token, _item = protected
    pending = _register(anon, hostname="intruder").json()
    reader = APIClient()
    reader.force_authenticate(viewer_user)
    grant_role(viewer_user, vault, "READER")
    listed = reader.get("/api/v1/agentRegistrations/", {"state": "PENDING"})
    assert listed.status_code == 200 and [r["id"] for r in listed.json()["results"]] == [pending["registration_id"]]
    operator_user = django_user_model.objects.create_user("operator", "op@example.com", "operator-pass-123")
    grant_role(operator_user, vault, "OPERATOR")
    operator = APIClient()
    operator.force_authenticate(operator_user)
    stranger = APIClient()
    stranger.force_authenticate(django_user_model.objects.create_user("stranger", "s@example.com", "stranger-pass-1"))
    for client, status in ((reader, 403), (operator, 403), (stranger, 404)):
        for decision in ("approve", "reject"):
            r = client.post(f"/api/v1/agentRegistrations/{pending['registration_id']}/{decision}")
            assert r.status_code == status, (decision, r.content)
    assert AgentRegistration.objects.get(pk=pending["registration_id"]).state == "PENDING"
    assert anon.post(f"/api/v1/agentRegistrations/{pending['registration_id']}/approve").status_code in (401, 403)


# --- revoking and rotating ----------------------------------------------------------------------


def test_revoking_an_agent_shuts_it_out_until_it_is_approved_again(protected, anon, api):
    vault, agent_id, token, item = protected
    r = api.post(f"/api/v1/agents/{agent_id}/revoke")
    assert r.status_code == 200 and r.json()["token_generation"] == 1
    for call in (_assignment(anon, agent_id, token),
                 anon.post(f"/api/v1/agents/{agent_id}/heartbeat", {"items": []}, format="json", **_bearer(token))):
        assert call.status_code == 403 and call.json()["error"]["code"] == "token_revoked"
    item.refresh_from_db()
    assert item.token_generation == 1  # its item tokens went with it
    # Its old token no longer re-registers it: an administrator has to approve.
    again = _register(anon, token=token)
    assert again.status_code == 202
    api.post(f"/api/v1/agentRegistrations/{again.json()['registration_id']}/approve")
    poll = anon.get(f"/api/v1/agents/registrations/{again.json()['registration_id']}", **_bearer(again.json()["poll_token"]))
    assert _assignment(anon, agent_id, poll.json()["token"]).status_code == 200
    assert token_generation(poll.json()["token"]) == 2
    # The credentials of that approval are gone once the agent is revoked again.
    api.post(f"/api/v1/agents/{agent_id}/revoke")
    stale = anon.get(f"/api/v1/agents/registrations/{again.json()['registration_id']}", **_bearer(again.json()["poll_token"]))
    assert stale.status_code == 409 and "register the agent again" in stale.json()["error"]["message"]


def test_rotating_an_agent_hands_the_new_token_out_with_the_assignment(protected, anon, api):
    _vault, agent_id, old, item = protected
    r = api.post(f"/api/v1/agents/{agent_id}/rotateToken")
    assert r.status_code == 200 and r.json()["rotating"] is True
    # The previous token fetches the assignment only, which carries the new token.
    answer = _assignment(anon, agent_id, old)
    assert answer.status_code == 200
    new = answer.json()["agent_token"]
    assert token_generation(new) == 1 and answer.json()["items"][0]["item_token"] == item_token(
        item=ProtectedItem.objects.get(pk=item.pk))
    beat = anon.post(f"/api/v1/agents/{agent_id}/heartbeat", {"items": []}, format="json", **_bearer(old))
    assert beat.status_code == 403 and beat.json()["error"]["code"] == "token_rotated"
    # The first call with the new token ends the rotation: the previous one is refused from then on.
    assert anon.post(f"/api/v1/agents/{agent_id}/heartbeat", {"items": []}, format="json", **_bearer(new)).status_code == 204
    assert MobilityAgent.objects.get(pk=agent_id).rotating is False
    assert _assignment(anon, agent_id, old).json()["error"]["code"] == "token_revoked"
    assert "agent_token" not in _assignment(anon, agent_id, new).json()


def test_rotating_an_item_token_reaches_the_process_servers_heartbeat(protected, anon, api, viewer_user):
    vault, agent_id, token, item = protected
    before = _assignment(anon, agent_id, token).json()["items"][0]["item_token"]
    r = api.post(f"/api/v1/replicationProtectedItems/{item.pk}/rotateToken")
    assert r.status_code == 200 and r.json()["token_generation"] == 1
    after = _assignment(anon, agent_id, token).json()["items"][0]["item_token"]
    assert after != before and token_generation(after) == 1
    from replication.tokens import process_server_token

    beat = anon.post(f"/api/v1/processServers/{item.process_server_id}/heartbeat", {}, format="json",
                     **_bearer(process_server_token(server=item.process_server)))
    assert beat.status_code == 200 and beat.json() == {"token_generations": {str(item.pk): 1}}
    assert Event.objects.filter(kind="item_token_rotated", protected_item=item).exists()
    # Rotating is for those who manage the vault's infrastructure.
    for role in ("READER", "OPERATOR"):
        grant_role(viewer_user, vault, role)
        client = APIClient()
        client.force_authenticate(viewer_user)
        assert client.post(f"/api/v1/replicationProtectedItems/{item.pk}/rotateToken").status_code == 403
    assert ProtectedItem.objects.get(pk=item.pk).token_generation == 1


def test_tokens_of_one_subject_never_pass_for_another():
    key = b"k" * 32
    assert issue_token(key, "process-server", 5) != issue_token(key, "process-server:5")
    forged = "lb1.5." + issue_token(key, "process-server:5")[len("lb1."):]  # the same MAC, claiming generation 5
    assert check_token(key, forged, "process-server", min_generation=0) != VALID
    for bad in ("lb1.05." + "A" * 43, "lb1.-1." + "A" * 43, "lb1.1.2." + "A" * 43, "lb1." + "9" * 20 + "." + "A" * 43,
                "lb2." + "A" * 43, "", "lb1.\u00e9"):
        assert check_token(key, bad, "item:a") != VALID
    token = issue_token(key, "item:a", 3)
    assert check_token(key, token, "item:a", min_generation=3) == VALID
    assert check_token(key, token, "item:a", min_generation=4) == REVOKED
    assert check_token(key, token, "item:b", min_generation=0) != VALID


# --- the portal ---------------------------------------------------------------------------------


def test_the_infrastructure_page_lists_pending_registrations_with_approve_and_reject(protected, anon, client, admin_user,
                                                                                    viewer_user):
    vault, agent_id, token, _item = protected
    pending = _register(anon, hostname="intruder.corp", disks=(("/etc/shadow", 1),)).json()
    client.force_login(viewer_user)
    grant_role(viewer_user, vault, "READER")
    page = client.get("/infrastructure/", {"vault": vault.pk}).content.decode()
    assert "Agent registrations waiting for approval" in page and "intruder.corp" in page and "/etc/shadow" in page
    assert ">Approve<" not in page  # a reader sees them, without the buttons
    assert client.post(f"/infrastructure/agent-registrations/{pending['registration_id']}/approve/").status_code == 403
    client.force_login(admin_user)
    page = client.get("/infrastructure/", {"vault": vault.pk}).content.decode()
    assert ">Approve<" in page and ">Reject<" in page
    r = client.post(f"/infrastructure/agent-registrations/{pending['registration_id']}/reject/", follow=True)
    assert r.status_code == 200 and "was rejected" in r.content.decode()
    assert AgentRegistration.objects.get(pk=pending["registration_id"]).state == "REJECTED"
    assert "intruder.corp" not in client.get("/infrastructure/").content.decode()
    assert _assignment(anon, agent_id, token).status_code == 200
