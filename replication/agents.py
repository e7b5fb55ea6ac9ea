"""Services for mobility agents and process servers talking to the configuration server.

Registering: an agent joins with the vault's passphrase. A machine that has no agent yet gets
one at once (201, with its token). A machine that has one is re-registered only by that
agent, showing its current token; anyone else who knows the passphrase gets a *pending
registration* (``AgentRegistration``): no token, no change to the machine, until an
administrator approves it (the machine's agent then takes the registration's hostname and
disks, its token generation and its items' token generations are bumped, so the old agent's
tokens stop working) or rejects it. The registering agent polls with a secret of its own.

Tokens are those of ``replication.tokens``, at the generation the agent or item holds:
revoking an agent bumps its generation (it must register again, which an administrator
approves); rotating hands the agent a new token with its next assignment; rotating an
item's token makes the process servers refuse the older ones from their next heartbeat.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import NamedTuple

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from core.exceptions import Conflict, InvalidTransition, NotFound
from replication.choices import ProtectionState as P
from replication.choices import RegistrationState as R
from replication.data_path import process_server_data_path_record
from replication.disk_shape import protected_item_disks_sync
from replication.models import AgentRegistration, MobilityAgent, ProtectedItem
from replication.selectors import items_switching_process_server
from replication.services import protected_item_mark_resync_required
from replication.tokens import VALID, agent_token, agent_token_check, item_token, item_token_generations
from replication.tokens import process_server_token as process_server_token  # re-exported: callers import it here
from replication.tokens import process_server_token_valid as process_server_token_valid  # re-exported
from vault.choices import MachineSource, Severity
from vault.models import DiscoveredDisk, DiscoveredMachine, ProcessServer, Vault
from vault.services import event_record

logger = logging.getLogger(__name__)

# The agent replicates an item in these states (ENABLING ends when replica disks exist; a
# planned failover still takes the source's last writes and its final bookmark).
ASSIGNED_STATES = frozenset({P.INITIAL_REPLICATION, P.PROTECTED, P.RESYNC_REQUIRED, P.RESYNCING,
                             P.FAILOVER_IN_PROGRESS})

APPROVAL_SENTENCE = ("This machine already has a mobility agent, and this registration did not show that agent's "
                     "token: it is waiting for an administrator's approval in the portal (Infrastructure, "
                     "Agent registrations). The agent gets its credentials once it is approved.")
# Pending registrations kept per machine: more is someone knocking, not an agent reinstalled.
MAX_PENDING_PER_MACHINE = 10
POLL_PREFIX = "lbr_"


class Registered(NamedTuple):
    """The agent registered: its row and its token."""

    agent: MobilityAgent
    token: str


class AwaitingApproval(NamedTuple):
    """The registration waits for an administrator; ``poll_token`` is the registering agent's
    secret to ask for the outcome (answered once, kept only as a SHA-256)."""

    registration: AgentRegistration
    poll_token: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _machine_uuid(hostname: str, machine: dict) -> str:
    return machine.get("instance_uuid") or f"agent:{hostname}"


def _apply_registration(*, vault: Vault, record: DiscoveredMachine, hostname: str, machine: dict,
                        version: str) -> MobilityAgent:
    """The machine as the (accepted) registration describes it, and its agent row."""
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
    agent, _ = MobilityAgent.objects.update_or_create(
        machine=record, defaults={"vault": vault, "hostname": hostname, "version": version, "disks": machine["disks"]}
    )
    # Disks added or removed since the item was protected (found by the agent itself).
    for item in ProtectedItem.objects.filter(machine=record):
        protected_item_disks_sync(item=item)
    return agent


@transaction.atomic
def agent_register(*, vault: Vault, hostname: str, machine: dict, version: str = "", token: str | None = None,
                   remote_addr: str | None = None) -> Registered | AwaitingApproval:
    """Register the agent of a machine (module docstring): a new machine's agent, or the
    machine's own agent showing its current ``token``, is registered at once; anyone else
    gets a pending registration for an administrator to approve."""
    uuid_ = _machine_uuid(hostname, machine)
    record, created = DiscoveredMachine.objects.select_for_update().get_or_create(
        vault=vault, instance_uuid=uuid_,
        defaults={"name": machine["name"], "source": MachineSource.AGENT, "power_state": "poweredOn"},
    )
    existing = None if created else MobilityAgent.objects.filter(machine=record).select_related("vault").first()
    if existing is not None and not (token and agent_token_check(agent=existing, token=token) == VALID):
        return _registration_pending(vault=vault, record=record, hostname=hostname, machine=machine, version=version,
                                     remote_addr=remote_addr)
    agent = _apply_registration(vault=vault, record=record, hostname=hostname, machine=machine, version=version)
    if agent.rotating:  # it showed its new token: the rotation is over
        agent_rotation_done(agent=agent)
    event_record(vault=vault, kind="agent_registered", message=f"Mobility agent on {hostname} registered for {record.name}.")
    return Registered(agent, agent_token(agent=agent))


def _registration_pending(*, vault: Vault, record: DiscoveredMachine, hostname: str, machine: dict, version: str,
                          remote_addr: str | None) -> AwaitingApproval:
    pending = AgentRegistration.objects.filter(machine=record, state=R.PENDING).count()
    if pending >= MAX_PENDING_PER_MACHINE:
        raise Conflict(f"{record.name} has {pending} registrations waiting for approval already: an administrator "
                       "approves or rejects them in the portal (Infrastructure, Agent registrations) first.",
                       code="too_many_pending")
    secret = POLL_PREFIX + secrets.token_urlsafe(32)
    registration = AgentRegistration.objects.create(
        vault=vault, machine=record, hostname=hostname, version=version, report=machine,
        remote_addr=remote_addr or None, poll_digest=_digest(secret),
    )
    where = f" from {remote_addr}" if remote_addr else ""
    event_record(vault=vault, kind="agent_registration_pending", severity=Severity.WARNING,
                 message=f"A mobility agent on {hostname}{where} asked to register as {record.name}, which has an "
                         "agent already, without that agent's token: approve or reject it in the portal "
                         "(Infrastructure, Agent registrations).")
    return AwaitingApproval(registration, secret)


def agent_registration_poll(*, registration_id, poll_token: str) -> Registered | AgentRegistration:
    """What the registering agent learns: its credentials once approved (``Registered``), the
    registration itself while it waits or after it was rejected. An unknown id and a wrong
    secret are the same ``NotFound``, so the answer gives nothing away."""
    registration = AgentRegistration.objects.filter(pk=registration_id).select_related("machine", "vault").first()
    if registration is None or not hmac.compare_digest(registration.poll_digest, _digest(poll_token or "")):
        raise NotFound("No such registration, or the wrong secret for it.", code="unknown_registration")
    if registration.state != R.APPROVED:
        return registration
    agent = MobilityAgent.objects.filter(machine=registration.machine_id).select_related("vault").first()
    if agent is None or agent.token_generation != registration.agent_generation:
        raise InvalidTransition("The credentials this registration was approved for were revoked or replaced "
                                "since: register the agent again.", current_state="superseded",
                                operation="fetch the credentials of")
    return Registered(agent, agent_token(agent=agent))


def _revoke_items_of(machine_id) -> int:
    """Bump the token generation of every item of the machine: the process servers refuse
    the old item tokens from their next heartbeat."""
    return ProtectedItem.objects.filter(machine=machine_id).update(token_generation=F("token_generation") + 1)


def _decide(*, registration_id, to_state: str, user) -> AgentRegistration:
    """Compare-and-set a pending registration to ``to_state`` (exactly one row, or 409 with
    the state it is in)."""
    changed = AgentRegistration.objects.filter(pk=registration_id, state=R.PENDING).update(
        state=to_state, decided_at=timezone.now(), decided_by=user if user and user.is_authenticated else None,
    )
    registration = AgentRegistration.objects.select_related("vault", "machine").filter(pk=registration_id).first()
    if registration is None:
        raise NotFound("No such agent registration.")
    if not changed:
        verb = "approve" if to_state == R.APPROVED else "reject"
        raise InvalidTransition(f"This registration is {registration.get_state_display().lower()} already: it cannot "
                                f"be {verb}d.", current_state=registration.state, operation=f"{verb} the registration of")
    return registration


@transaction.atomic
def agent_registration_approve(*, registration_id, user=None) -> AgentRegistration:
    """The registration becomes the machine's agent: its hostname and disks are the agent's,
    the agent's token generation and its items' are bumped (the old agent's tokens stop
    working: the configuration server refuses them at once, the process servers from their
    next heartbeat), and the registering agent's poll gets the new credentials."""
    registration = _decide(registration_id=registration_id, to_state=R.APPROVED, user=user)
    record = DiscoveredMachine.objects.select_for_update().get(pk=registration.machine_id)
    agent = _apply_registration(vault=registration.vault, record=record, hostname=registration.hostname,
                                machine=registration.report, version=registration.version)
    MobilityAgent.objects.filter(pk=agent.pk).update(token_generation=F("token_generation") + 1, rotating=False,
                                                     last_heartbeat_at=None, last_status={})
    agent.refresh_from_db()
    AgentRegistration.objects.filter(pk=registration.pk).update(agent_generation=agent.token_generation)
    items = _revoke_items_of(record.pk)
    who = f" by {user.get_username()}" if user is not None and user.is_authenticated else ""
    event_record(vault=registration.vault, kind="agent_registration_approved", severity=Severity.WARNING,
                 message=f"The registration of {registration.hostname} as the agent of {record.name} was "
                         f"approved{who}: the previous agent's token and {items} item token"
                         f"{'s' if items != 1 else ''} were revoked.")
    registration.refresh_from_db()
    return registration


def agent_registration_reject(*, registration_id, user=None) -> AgentRegistration:
    """The registration gets nothing; the machine's agent is untouched."""
    registration = _decide(registration_id=registration_id, to_state=R.REJECTED, user=user)
    who = f" by {user.get_username()}" if user is not None and user.is_authenticated else ""
    event_record(vault=registration.vault, kind="agent_registration_rejected",
                 message=f"The registration of {registration.hostname} as the agent of {registration.machine.name} "
                         f"was rejected{who}.")
    return registration


@transaction.atomic
def agent_revoke(*, agent: MobilityAgent, user=None) -> MobilityAgent:
    """Revoke the agent's token and its items' tokens at once. The agent is shut out until it
    registers again, which an administrator approves."""
    MobilityAgent.objects.filter(pk=agent.pk).update(token_generation=F("token_generation") + 1, rotating=False)
    items = _revoke_items_of(agent.machine_id)
    agent.refresh_from_db()
    who = f" by {user.get_username()}" if user is not None and user.is_authenticated else ""
    event_record(vault=agent.vault, kind="agent_revoked", severity=Severity.WARNING,
                 message=f"The credentials of the mobility agent on {agent.hostname} were revoked{who} (and {items} "
                         f"item token{'s' if items != 1 else ''}): it replicates again once it registers anew and "
                         "an administrator approves it.")
    return agent


@transaction.atomic
def agent_rotate(*, agent: MobilityAgent, user=None) -> MobilityAgent:
    """Give the agent a new token and its items new tokens. Its next assignment fetch (the
    only call the previous token still makes) hands it the new token; its first call with
    the new one ends the rotation and the previous token with it. The item tokens rotate as
    with ``protected_item_rotate_token``."""
    MobilityAgent.objects.filter(pk=agent.pk).update(token_generation=F("token_generation") + 1, rotating=True)
    items = _revoke_items_of(agent.machine_id)
    agent.refresh_from_db()
    who = f" by {user.get_username()}" if user is not None and user.is_authenticated else ""
    event_record(vault=agent.vault, kind="agent_token_rotated",
                 message=f"The token of the mobility agent on {agent.hostname} was rotated{who} (and {items} item "
                         f"token{'s' if items != 1 else ''}): the agent takes the new ones with its next assignment.")
    return agent


def agent_rotation_done(*, agent: MobilityAgent) -> None:
    """The agent called with its new token: the previous one stops fetching the assignment."""
    MobilityAgent.objects.filter(pk=agent.pk, token_generation=agent.token_generation, rotating=True).update(rotating=False)
    agent.rotating = False


def protected_item_rotate_token(*, item: ProtectedItem, user=None) -> ProtectedItem:
    """A new item token: process servers refuse the older ones (401) from their next
    heartbeat; the agent takes the new one with its next assignment (it asks again at once
    when a process server refuses its token)."""
    ProtectedItem.objects.filter(pk=item.pk).update(token_generation=F("token_generation") + 1)
    item.refresh_from_db(fields=["token_generation"])
    who = f" by {user.get_username()}" if user is not None and user.is_authenticated else ""
    event_record(vault=item.vault, kind="item_token_rotated", protected_item=item,
                 message=f"The item token of {item.name} was rotated{who}: process servers refuse the previous one "
                         "from their next heartbeat.")
    return item


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
    switching = items_switching_process_server(item_ids=[item.pk for item in items])
    for item in items:
        ps = item.process_server
        if not ps.thumbprint:
            continue  # the process server has not reported its certificate yet: nothing to pin
        if switching.get(str(item.pk), ps.pk) != ps.pk:
            continue  # shipping paused while the old process server drains (Switch process server)
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
    answer = {"items": out}
    if agent.rotating:  # the rotation's new token, for an agent still calling with the previous one
        answer["agent_token"] = agent_token(agent=agent)
    return answer


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


def process_server_heartbeat(*, server: ProcessServer, report: dict) -> dict:
    """Record a process server's report; the answer tells it the lowest token generation
    still valid for every item of the vault whose token was rotated (it refuses older ones)."""
    fields = {k: report[k] for k in ("cpu_percent", "memory_percent", "cache_free_bytes", "cache_total_bytes", "pending_upload_bytes") if k in report}
    if report.get("thumbprint"):
        fields["thumbprint"] = report["thumbprint"]
    ProcessServer.objects.filter(pk=server.pk).update(last_heartbeat_at=timezone.now(), **fields)
    for item_id, figures in (report.get("items") or {}).items():
        acked = figures.get("acked_seq")
        if isinstance(acked, int):
            ProtectedItem.objects.filter(pk=item_id, process_server=server, acked_seq__lt=acked).update(acked_seq=acked)
    process_server_data_path_record(server=server, report=report)  # bytes and rates per item
    return {"token_generations": item_token_generations(vault=server.vault)}
