"""The push install of the simulated site's agents: what Lifeboat writes for them.

Lifeboat installs the agent of a simulated VM itself and writes its
``<site>/agents/<vm uuid>/credentials.json`` (0600): the agent id, its token, the
configuration server, and the disks the agent may read, with their write journals. This is
the push-installed agent's registration: the agent reads only disks listed there, whatever
an assignment names (``mobility/agent.py``), so a forged or malicious assignment cannot
point it at another file. The file is written again when a disk is added to the VM, before
the replica disk that names it is committed, so an assignment never names a disk the agent
was not told of. ``replication.agent_host`` runs the agents it finds there.
"""
from __future__ import annotations

import json
import os

from django.conf import settings

from mobility.durable import replace_durably
from replication.models import MobilityAgent
from replication.tokens import agent_token
from vault.connectors.simulated import disk_file, journal_path
from vault.models import DiscoveredMachine


def push_state_dir(machine: DiscoveredMachine) -> str:
    """The agent's state directory on the simulated site."""
    return os.path.join(machine.vcenter.host, "agents", machine.instance_uuid)


def push_credentials_write(*, machine: DiscoveredMachine, agent: MobilityAgent, paths: dict[str, list[str]]) -> str:
    """Write the agent's credentials and its disks ({disk key: [path, journal dir]});
    returns the file's path."""
    state_dir = push_state_dir(machine)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "credentials.json")
    disks = [{"key": int(key), "path": disk, "journal_dir": journal or None}
             for key, (disk, journal) in sorted(paths.items(), key=lambda kv: int(kv[0]))]
    body = {"agent_id": str(agent.pk), "token": agent_token(agent=agent), "config_url": settings.LIFEBOAT_CONFIG_URL,
            "disks": disks}
    replace_durably(path, json.dumps(body).encode(), mode=0o600)
    return path


def push_disks_update(*, machine: DiscoveredMachine) -> bool:
    """The VM's disks changed: list every disk it has now in its pushed agent's credentials
    (nothing to do for a machine whose agent was not pushed). True if written."""
    agent = MobilityAgent.objects.filter(machine=machine, pushed=True).select_related("vault").first()
    if agent is None or machine.vcenter is None:
        return False
    host, uuid_ = machine.vcenter.host, machine.instance_uuid
    paths = {str(d.key): [disk_file(host, uuid_, d.key), journal_path(host, uuid_, d.key)] for d in machine.disks.all()}
    push_credentials_write(machine=machine, agent=agent, paths=paths)
    return True
