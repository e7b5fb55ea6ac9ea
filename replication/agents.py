"""Services for mobility agents and process servers talking to the configuration server."""
from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from core.exceptions import NotFound
from replication.choices import ProtectionState as P
from replication.dataplane.auth import issue_token, item_subject, verify_token
from replication.disk_shape import protected_item_disks_sync
from replication.models import MobilityAgent, ProtectedItem
from replication.services import protected_item_mark_resync_required
from vault.choices import MachineSource
from vault.models import DiscoveredDisk, DiscoveredMachine, ProcessServer, Vault
from vault.services import event_record, vault_keys

logger = logging.getLogger(__name__)

# The agent replicates an item in these states (ENABLING ends when replica disks exist; a
# planned failover still takes the source's last writes and its final bookmark).
ASSIGNED_STATES = frozenset({P.INITIAL_REPLICATION, P.PROTECTED, P.RESYNC_REQUIRED, P.RESYNCING,
                             P.FAILOVER_IN_PROGRESS})


def _auth_key(vault: Vault) -> bytes:
    return vault_keys(vault=vault)[1]


def agent_token(*, agent: MobilityAgent) -> str:
    return issue_token(_auth_key(agent.vault), f"agent:{agent.pk}")


def agent_token_valid(*, agent: MobilityAgent, token: str) -> bool:
    return verify_token(_auth_key(agent.vault), token, f"agent:{agent.pk}")


def item_token(*, item: ProtectedItem) -> str:
    return issue_token(_auth_key(item.vault), item_subject(item.pk))


def process_server_token(*, server: ProcessServer) -> str:
    return issue_token(_auth_key(server.vault), f"process-server:{server.pk}")


def process_server_token_valid(*, server: ProcessServer, token: str) -> bool:
    return verify_token(_auth_key(server.vault), token, f"process-server:{server.pk}")


@transaction.atomic
def agent_register(*, vault: Vault, hostname: str, machine: dict, version: str = "") -> tuple[MobilityAgent, str]:
    """Register (or re-register) the agent of a physical or agent-managed machine."""
    uuid_ = machine.get("instance_uuid") or f"agent:{hostname}"
    record, _ = DiscoveredMachine.objects.select_for_update().get_or_create(
        vault=vault, instance_uuid=uuid_,
        defaults={"name": machine["name"], "source": MachineSource.AGENT, "power_state": "poweredOn"},
    )
    if record.source == MachineSource.VCENTER and record.vcenter_id:
        pass  # an agent installed by hand on a discovered VM: the VM keeps its vCenter
    record.name = machine["name"] if record.source == MachineSource.AGENT else record.name
    record.guest_os = machine.get("os", "") or record.guest_os
    record.host, record.missing, record.last_seen_at = hostname, False, timezone.now()
    record.save()
    if record.source == MachineSource.AGENT:
        keys = set()
        for disk in machine["disks"]:
            keys.add(disk["key"])
            DiscoveredDisk.objects.update_or_create(
                machine=record, key=disk["key"],
                defaults={"capacity_bytes": disk["capacity_bytes"], "backing_file": disk["path"], "label": disk.get("label") or f"Disk {disk['key']}"},
            )
        record.disks.exclude(key__in=keys).delete()
    agent, created = MobilityAgent.objects.update_or_create(
        machine=record, defaults={"vault": vault, "hostname": hostname, "version": version, "disks": machine["disks"]}
    )
    # Disks added or removed since the item was protected (found by the agent itself).
    for item in ProtectedItem.objects.filter(machine=record):
        protected_item_disks_sync(item=item)
    event_record(vault=vault, kind="agent_registered", message=f"Mobility agent on {hostname} registered for {record.name}.")
    return agent, agent_token(agent=agent)


def agent_push(*, machine: DiscoveredMachine) -> MobilityAgent:
    """The push install of an agent (done by Lifeboat for the simulated site)."""
    agent, _ = MobilityAgent.objects.get_or_create(
        machine=machine, defaults={"vault": machine.vault, "hostname": machine.name, "pushed": True}
    )
    return agent


def agent_assignment(*, agent: MobilityAgent) -> dict:
    items = (
        ProtectedItem.objects.filter(machine=agent.machine, protection_state__in=ASSIGNED_STATES)
        .select_related("process_server", "vault")
        .prefetch_related("replica_disks")
    )
    out = []
    for item in items:
        ps = item.process_server
        if not ps.thumbprint:
            continue  # the process server has not reported its certificate yet: nothing to pin
        out.append({
            "item_id": str(item.pk),
            "item_token": item_token(item=item),
            "process_server_url": ps.url,
            "process_server_thumbprint": ps.thumbprint,
            "resync": item.protection_state == P.RESYNCING,
            "resync_id": item.state_changed_at.isoformat() if item.protection_state == P.RESYNCING else "",
            # The replica is complete: an agent with no state for the item (a new agent, a
            # lost state folder, failback's returning replica seeded from the original disk)
            # compares with it instead of copying the disks whole. An agent with state ignores it.
            "seeded": item.protection_state == P.RESYNCING and item.initial_replication_progress == 100,
            "bookmarks": [{k: b[k] for k in ("id", "label", "positions", "group") if k in b} for b in item.pending_bookmarks],
            "disks": [
                {"index": d.index, "key": str(d.source_disk_key), "path": d.source_path, "journal_dir": d.journal_dir or None}
                for d in item.replica_disks.all() if d.removed_at is None  # a removed disk's stream ends
            ],
        })
    return {"items": out}


def agent_heartbeat(*, agent: MobilityAgent, report: dict) -> None:
    now = timezone.now()
    MobilityAgent.objects.filter(pk=agent.pk).update(last_heartbeat_at=now, last_status=report, version=report.get("version") or agent.version)
    by_item = {str(i.get("item_id")): i for i in report.get("items", []) if i.get("item_id")}
    items = ProtectedItem.objects.filter(machine=agent.machine_id)
    for item in items:
        status = by_item.get(str(item.pk), {})
        fields = {"agent_last_heartbeat_at": now}
        backlog = status.get("backlog_bytes")
        if isinstance(backlog, int) and backlog >= 0:
            fields["agent_backlog_bytes"] = backlog
        acked = status.get("acked_seq")
        if isinstance(acked, int) and acked >= item.acked_seq:
            fields["acked_seq"] = acked
        progress = status.get("progress")
        if status.get("phase") == "initial" and isinstance(progress, (int, float)) and item.protection_state == P.INITIAL_REPLICATION:
            fields["initial_replication_progress"] = max(0, min(99, int(progress * 100)))
        if status.get("last_error") and status["last_error"] != item.last_error:
            fields["last_error"] = str(status["last_error"])[:2000]
        elif not status.get("last_error") and status and item.last_error.startswith("Agent: "):
            fields["last_error"] = ""
        ProtectedItem.objects.filter(pk=item.pk).update(**fields)


def agent_event(*, agent: MobilityAgent, item_id, kind: str, message: str = "", progress: int | None = None) -> None:
    item = ProtectedItem.objects.filter(pk=item_id, machine=agent.machine_id).select_related("vault").first()
    if item is None:
        raise NotFound("This agent does not replicate that item.")
    if kind == "resync_required":
        protected_item_mark_resync_required(item=item, reason=message or "The mobility agent lost track of changes.")
    elif kind == "initial_progress" and progress is not None:
        ProtectedItem.objects.filter(pk=item.pk, protection_state=P.INITIAL_REPLICATION).update(initial_replication_progress=min(progress, 99))
    elif kind == "error":
        ProtectedItem.objects.filter(pk=item.pk).update(last_error=message[:2000])
        event_record(vault=item.vault, kind="agent_error", message=f"{item.name}: {message}", severity="WARNING", protected_item=item)
    elif kind == "resync_complete":
        event_record(vault=item.vault, kind="resync_sent", message=f"{item.name}: the agent finished sending the resynchronization pass.", protected_item=item)


def process_server_heartbeat(*, server: ProcessServer, report: dict) -> None:
    fields = {k: report[k] for k in ("cpu_percent", "memory_percent", "cache_free_bytes", "cache_total_bytes", "pending_upload_bytes") if k in report}
    if report.get("thumbprint"):
        fields["thumbprint"] = report["thumbprint"]
    ProcessServer.objects.filter(pk=server.pk).update(last_heartbeat_at=timezone.now(), **fields)
    for item_id, figures in (report.get("items") or {}).items():
        acked = figures.get("acked_seq")
        if isinstance(acked, int):
            ProtectedItem.objects.filter(pk=item_id, process_server=server, acked_seq__lt=acked).update(acked_seq=acked)
