"""Agents cannot impersonate, on real parts: the configuration server (live server), a real
process server process reporting to it, and the mobility agent (in this process and as its
command line). A rotated item token is refused (401) by the process server within a
heartbeat, nothing it sent is stored, and the agent goes on with the new token; a machine's
second agent waits for an administrator's approval before it gets any credentials."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest
from django.test import override_settings

from mobility.agent import Agent
from mobility.transport import RetryPolicy
from replication.dataplane import process_server
from replication.dataplane.auth import token_generation
from replication.models import AgentRegistration, MobilityAgent, ProtectedItem, ReplicaDisk
from replication.process_servers import process_server_config
from replication.tokens import item_token
from tests.conftest import wait_for
from tests.dataplane.fixtures_ps import https_request, make_batch, make_disk, replay, sha256_file, stored_batches, zero_image
from tests.e2e.harness import MiB, ROOT, free_port
from tests.factories import PolicyFactory, ProcessServerFactory, VaultFactory
from vault.models import DiscoveredMachine, ProcessServer
from vault.services import vault_keys

pytestmark = pytest.mark.timeout(300)

PASS = "e2e passphrase long enough"
REPORT_INTERVAL = 1.0
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)


@pytest.fixture
def site(tmp_path, live_server, transactional_db):
    settings = override_settings(LIFEBOAT_CONFIG_URL=live_server.url,
                                 LIFEBOAT_STORAGE={"kind": "local", "root": str(tmp_path / "storage")})
    settings.enable()
    servers = []
    yield live_server, servers
    for s in servers:
        s.kill()
    settings.disable()


def _spawn(tmp_path, ps: ProcessServer, **changes) -> process_server.ProcessServerProcess:
    config = {**process_server_config(server=ps, cache_dir=str(tmp_path / "ps-cache")),
              "report_interval": REPORT_INTERVAL, **changes}
    return process_server.spawn({k: v for k, v in config.items() if v is not None},
                                config_path=str(tmp_path / "ps.json"), log_path=str(tmp_path / "ps.log"))


def _storage_bytes(root) -> dict[str, bytes]:
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_a_rotated_item_token_is_refused_within_a_heartbeat_and_the_agent_takes_the_new_one(tmp_path, site, api):
    live, servers = site
    vault = VaultFactory(passphrase=PASS)
    ps = ProcessServerFactory(vault=vault, data_port=free_port())
    proc = _spawn(tmp_path, ps)
    servers.append(proc)
    wait_for(lambda: ProcessServer.objects.get(pk=ps.pk).thumbprint == proc.thumbprint, message="the first heartbeat")

    disk = make_disk(str(tmp_path / "disk0.img"), 4 * MiB, seed=3)
    machine = {"name": "db-01", "instance_uuid": "4201-db-01", "disks": [{"key": 0, "path": disk, "capacity_bytes": 4 * MiB}]}
    agent = Agent(state_dir=str(tmp_path / "agent"), config_url=live.url, passphrase=PASS, machine=machine,
                  block_bytes=256 * 1024, batch_bytes=MiB, retry=FAST_RETRY, assignment_interval=3600)
    agent.register()
    record = DiscoveredMachine.objects.get(instance_uuid="4201-db-01")
    item = ProtectedItem.objects.create(vault=vault, machine=record, policy=PolicyFactory(vault=vault), process_server=ps,
                                        name="db-01")
    ReplicaDisk.objects.create(item=item, index=0, source_disk_key=0, capacity_bytes=4 * MiB, storage_name="db-01-0",
                               source_path=disk)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="INITIAL_REPLICATION")
    agent.fetch_assignment()
    agent.replicate_until_caught_up(timeout=60)
    old = agent.assignment[0].item_token
    assert token_generation(old) == 0

    # An administrator rotates the item's token.
    r = api.post(f"/api/v1/replicationProtectedItems/{item.pk}/rotateToken")
    assert r.status_code == 200 and r.json()["token_generation"] == 1
    rotated_at = time.monotonic()
    item_path = f"/v1/items/{item.pk}"
    wait_for(lambda: https_request(proc.port, "GET", item_path, headers={"Authorization": f"Bearer {old}"}).status == 401,
             timeout=10, interval=0.05, message="the process server to refuse the old token")
    assert time.monotonic() - rotated_at <= 2 * REPORT_INTERVAL + 1.0  # its next heartbeat, not later

    # A batch with the old token: 401, and nothing is stored or acknowledged.
    new = item_token(item=ProtectedItem.objects.get(pk=item.pk))

    def stream():
        return https_request(proc.port, "GET", item_path, headers={"Authorization": f"Bearer {new}"}).body

    acked = wait_for(lambda: (s := stream())["uploaded_seq"] == s["acked_seq"] and s["acked_seq"],
                     message="every acknowledged batch in storage")
    storage_root = tmp_path / "storage"
    before = _storage_bytes(storage_root)
    refused = https_request(proc.port, "POST", f"{item_path}/batches", headers={"Authorization": f"Bearer {old}"},
                            body=make_batch(item.pk, acked + 1))
    assert refused.status == 401 and refused.body["error"]["code"] == "token_revoked"
    time.sleep(REPORT_INTERVAL)  # an upload of it would have happened by now
    assert _storage_bytes(storage_root) == before
    assert stream()["acked_seq"] == acked
    assert not os.listdir(tmp_path / "ps-cache" / "tmp")

    # The agent still holds the old token: the process server refuses its next batch, it asks
    # the configuration server for its assignment again and goes on with the new token.
    rng = random.Random(5)
    with open(disk, "r+b") as f:
        for _ in range(16):
            f.seek(rng.randrange(0, 4 * MiB // 4096) * 4096)
            f.write(rng.randbytes(4096))
    agent.replicate_until_caught_up(timeout=60)
    assert agent.assignment[0].item_token == new
    log = (tmp_path / "ps.log").read_text()
    assert log.count(f"refused a batch for item {item.pk}") >= 2, log[-3000:]  # ours above, then the agent's
    agent.close()
    wait_for(lambda: (s := stream())["uploaded_seq"] == s["acked_seq"] > acked, message="the new batches in storage")
    image = zero_image(str(tmp_path / "replica.img"), 4 * MiB)
    replay(stored_batches(process_server_storage(tmp_path), item.pk, vault_keys(vault=vault)[0]), {0: image})
    assert sha256_file(image) == sha256_file(disk)

    # A restarted process server refuses the old token before its first heartbeat: it kept
    # the generations in its cache directory (the configuration here names none, and the
    # configuration server cannot be reached).
    proc.stop()
    proc = _spawn(tmp_path, ps, token_generations=None, report_url=f"http://127.0.0.1:{free_port()}/nowhere")
    servers.append(proc)
    assert https_request(proc.port, "GET", item_path, headers={"Authorization": f"Bearer {old}"}).status == 401
    assert https_request(proc.port, "GET", item_path, headers={"Authorization": f"Bearer {new}"}).status == 200


def process_server_storage(tmp_path):
    from replication.dataplane.storage import open_storage

    return open_storage({"kind": "local", "root": str(tmp_path / "storage")})


def _mobility(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "mobility", "--log-level", "INFO", *args], capture_output=True,
                          text=True, timeout=60, cwd=str(ROOT), input=stdin)


def test_a_second_agent_for_a_machine_gets_credentials_only_once_approved(tmp_path, site, api):
    live, _servers = site
    VaultFactory(passphrase=PASS)
    disk = make_disk(str(tmp_path / "disk0.img"), 1 * MiB)
    register = ["register", "--config-url", live.url, "--passphrase-file", "-", "--instance-uuid", "4201-web-01",
                "--name", "web-01", "--disk", f"0={disk}"]
    first = _mobility(*register, "--state-dir", str(tmp_path / "first"), stdin=PASS)
    assert first.returncode == 0, first.stderr
    agent_id = first.stdout.strip()

    # Another installation with the passphrase but without the first agent's credentials.
    second_dir = tmp_path / "second"
    second = _mobility(*register, "--state-dir", str(second_dir), "--hostname", "web-01-new", stdin=PASS)
    assert second.returncode == 3, (second.stdout, second.stderr)
    assert "waiting for an administrator's approval in the portal" in second.stderr
    assert "'python -m mobility run' takes the credentials" in second.stderr
    assert not (second_dir / "credentials.json").exists() and (second_dir / "registration.json").exists()
    registration = AgentRegistration.objects.get(hostname="web-01-new")
    # Asking again, or running, changes nothing while it waits.
    assert _mobility(*register, "--state-dir", str(second_dir), "--hostname", "web-01-new", stdin=PASS).returncode == 3
    assert AgentRegistration.objects.count() == 1
    waiting = _mobility("run", "--once", "--state-dir", str(second_dir))
    assert waiting.returncode == 0 and not (second_dir / "credentials.json").exists()

    assert api.post(f"/api/v1/agentRegistrations/{registration.pk}/approve").status_code == 200
    approved = _mobility("run", "--once", "--state-dir", str(second_dir))
    assert approved.returncode == 0, approved.stderr
    creds = json.loads((second_dir / "credentials.json").read_text())
    assert creds["agent_id"] == agent_id and creds["disks"] == [{"key": 0, "path": disk, "journal_dir": None}]
    assert not (second_dir / "registration.json").exists()
    assert MobilityAgent.objects.get(pk=agent_id).hostname == "web-01-new"
    # The first installation's credentials no longer work; registering again with them waits
    # for approval too, and its run takes the new credentials once approved.
    first_dir = tmp_path / "first"
    old = _mobility("run", "--once", "--state-dir", str(first_dir))
    assert "credentials were revoked" in old.stderr
    assert _mobility(*register, "--state-dir", str(first_dir), stdin=PASS).returncode == 3
    back = AgentRegistration.objects.get(hostname=os.uname().nodename, state="PENDING")
    assert api.post(f"/api/v1/agentRegistrations/{back.pk}/approve").status_code == 200
    assert _mobility("run", "--once", "--state-dir", str(first_dir)).returncode == 0
    assert not (first_dir / "registration.json").exists()
    assert token_generation(json.loads((first_dir / "credentials.json").read_text())["token"]) == 2
    assert api.post(f"/api/v1/agentRegistrations/{registration.pk}/approve").status_code == 409
    # The second installation is the one refused now; it is approved back for what follows.
    again = _mobility(*register, "--state-dir", str(second_dir), "--hostname", "web-01-new", stdin=PASS)
    assert again.returncode == 3
    assert api.post(f"/api/v1/agentRegistrations/{AgentRegistration.objects.get(state='PENDING').pk}/approve").status_code == 200
    assert _mobility("run", "--once", "--state-dir", str(second_dir)).returncode == 0
    creds = json.loads((second_dir / "credentials.json").read_text())
    assert token_generation(creds["token"]) == 3
    # A rotated agent token: the next assignment hands the new one out, the agent keeps it and
    # its first call with it ends the rotation.
    assert api.post(f"/api/v1/agents/{agent_id}/rotateToken").status_code == 200
    assert _mobility("run", "--once", "--state-dir", str(second_dir)).returncode == 0
    rotated = json.loads((second_dir / "credentials.json").read_text())
    assert token_generation(rotated["token"]) == token_generation(creds["token"]) + 1
    assert rotated["disks"] == creds["disks"] and not MobilityAgent.objects.get(pk=agent_id).rotating
    # A rejected registration is forgotten by the agent, with a sentence.
    third_dir = tmp_path / "third"
    assert _mobility(*register, "--state-dir", str(third_dir), "--hostname", "web-01-x", stdin=PASS).returncode == 3
    api.post(f"/api/v1/agentRegistrations/{AgentRegistration.objects.get(hostname='web-01-x').pk}/reject")
    rejected = _mobility(*register, "--state-dir", str(third_dir), "--hostname", "web-01-x", stdin=PASS)
    assert rejected.returncode == 1 and "rejected this registration" in rejected.stderr
    assert not (third_dir / "registration.json").exists() and not (third_dir / "credentials.json").exists()
