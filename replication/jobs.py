"""Job handlers of replication: enable, disable, resynchronize."""
from __future__ import annotations

import json
import logging
import os
import time

from django.conf import settings
from django.db import transaction

from core import queues
from core.choices import JobType
from core.exceptions import InvalidTransition, LifeboatError
from core.jobs import JobContext, job_handler
from core.text import size_text
from replication.agents import agent_push, agent_token
from replication.choices import ProtectionState as P
from replication.engine import storage
from replication.models import MobilityAgent, ProtectedItem, ReplicaDisk
from replication.services import protected_item_transition
from vault.choices import MachineSource, VCenterKind
from vault.models import ProcessServer
from vault.services import event_record

logger = logging.getLogger(__name__)
POLL = 1.0


def _item(ctx: JobContext) -> ProtectedItem:
    return ProtectedItem.objects.select_related("vault", "machine", "machine__vcenter", "policy", "process_server").get(pk=ctx.job.target_id)


# --- enable ---------------------------------------------------------------------------------


def _enable_failed(job, error: str) -> None:
    ProtectedItem.objects.filter(pk=job.target_id, protection_state=P.ENABLING).update(
        protection_state=P.ENABLE_FAILED, last_error=error[:2000]
    )


def simulated_site_for(item: ProtectedItem):
    from vault.discovery import connector_for

    return connector_for(item.machine.vcenter)


def agent_install(ctx: JobContext, item: ProtectedItem) -> dict[int, tuple[str, str]]:
    """Make sure the machine has an agent; returns {disk key: (source path, journal dir)}."""
    machine = item.machine
    vcenter = machine.vcenter
    if vcenter is not None and vcenter.kind == VCenterKind.SIMULATED:
        site = simulated_site_for(item)
        agent = agent_push(machine=machine)
        state_dir = os.path.join(vcenter.host, "agents", machine.instance_uuid)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        _write_private_json(
            os.path.join(state_dir, "credentials.json"),
            {"agent_id": str(agent.pk), "token": agent_token(agent=agent), "config_url": settings.LIFEBOAT_CONFIG_URL},
        )
        ctx.progress(100, message="Installed by Lifeboat on the simulated site.")
        return {d.key: (site.disk_path(machine.instance_uuid, d.key), site.journal_dir(machine.instance_uuid, d.key)) for d in machine.disks.all()}
    if machine.source == MachineSource.AGENT:
        return {d.key: (d.backing_file, "") for d in machine.disks.all()}
    # A vCenter VM: the agent is installed by hand on it and registers with the vault.
    command = (
        f"python -m mobility register --config-url {settings.LIFEBOAT_CONFIG_URL} --passphrase <vault passphrase> "
        f"--instance-uuid {machine.instance_uuid} --disk <key>=<device path> ... && python -m mobility run"
    )
    deadline = time.monotonic() + settings.LIFEBOAT_AGENT_INSTALL_TIMEOUT
    while True:
        agent = MobilityAgent.objects.filter(machine=machine).first()
        if agent is not None:
            paths = {int(d["key"]): (d["path"], "") for d in agent.disks}
            missing = [d.key for d in machine.disks.all() if d.key not in paths]
            if missing:
                raise LifeboatError(f"The agent on {machine.name} did not report disks {missing}; re-register it with every disk.")
            return paths
        if time.monotonic() > deadline:
            raise LifeboatError(
                f"No mobility agent registered for {machine.name} within {settings.LIFEBOAT_AGENT_INSTALL_TIMEOUT // 60} minutes. "
                f"Install it on the VM and run: {command}"
            )
        ctx.progress(0, message=f"Waiting for the mobility agent to register. Install it on the VM: {command}")
        ctx.pause(2)


def _write_private_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _take_initial_slot(ctx: JobContext, item: ProtectedItem) -> None:
    """Start the initial copy when the process server has a free slot (batched copies)."""
    limit = settings.LIFEBOAT_MAX_CONCURRENT_INITIAL
    while True:
        with transaction.atomic():
            ProcessServer.objects.select_for_update().get(pk=item.process_server_id)
            running = ProtectedItem.objects.filter(process_server=item.process_server_id, protection_state=P.INITIAL_REPLICATION).count()
            if running < limit:
                protected_item_transition(item_id=item.pk, to_state=P.INITIAL_REPLICATION, operation="start initial replication")
                return
        ctx.progress(0, message=f"Waiting for a free initial-replication slot on {item.process_server.name} ({running} of {limit} in use).")
        ctx.pause(2)


@job_handler(JobType.ENABLE_REPLICATION, queue=queues.DATA, on_failure=_enable_failed)
def run_enable(ctx: JobContext) -> dict:
    item = _item(ctx)
    if item.protection_state != P.ENABLING:
        raise LifeboatError(f"{item.name} is {item.get_protection_state_display().lower()}, not being enabled.")
    with ctx.step("Check prerequisites"):
        disks = list(item.machine.disks.all())
        if not disks:
            raise LifeboatError(f"{item.machine.name} has no disks to replicate.")
        if item.machine.missing:
            raise LifeboatError(f"{item.machine.name} is missing from its vCenter's inventory.")
        storage().list_objects(f"logs/{item.pk}/")  # target storage answers
    with ctx.step("Install the mobility agent"):
        paths = agent_install(ctx, item)
    with ctx.step("Create replica disks"):
        for index, disk in enumerate(sorted(disks, key=lambda d: d.key)):
            path, journal = paths[disk.key]
            rd, _ = ReplicaDisk.objects.update_or_create(
                item=item, index=index,
                defaults={"source_disk_key": disk.key, "label": disk.label, "capacity_bytes": disk.capacity_bytes,
                          "storage_name": f"{item.pk}-disk{index}", "source_path": path, "journal_dir": journal or ""},
            )
            if not storage().disk_exists(rd.storage_name):
                storage().create_disk(rd.storage_name, rd.capacity_bytes)
            ctx.progress(100 * (index + 1) / len(disks))
    with ctx.step("Initial replication"):
        _take_initial_slot(ctx, item)
        while True:
            item.refresh_from_db(fields=["protection_state", "initial_replication_progress", "last_error"])
            if item.protection_state == P.PROTECTED:
                break
            if item.protection_state != P.INITIAL_REPLICATION:
                raise LifeboatError(f"Initial replication stopped: {item.name} is now {item.get_protection_state_display().lower()}. {item.last_error}".strip())
            ctx.progress(item.initial_replication_progress, message=f"{item.initial_replication_progress}% copied")
            ctx.pause(POLL)
    with ctx.step("Start delta replication"):
        event_record(vault=item.vault, kind="protected", message=f"{item.name} is protected.", protected_item=item)
    return {"disks": len(disks)}


# --- disable --------------------------------------------------------------------------------


def _disable_failed(job, error: str) -> None:
    ProtectedItem.objects.filter(pk=job.target_id).update(last_error=f"Disabling failed: {error}"[:2000])


@job_handler(JobType.DISABLE_REPLICATION, queue=queues.CONTROL, on_failure=_disable_failed)
def run_disable(ctx: JobContext) -> dict:
    from replication.engine import applier_for

    item = _item(ctx)
    with ctx.step("Stop replication"):
        pass  # in DISABLING the item is out of its agent's assignment: the agent stops sending
    with ctx.step("Remove replica data"):
        if item.replica_disks.exists():
            applier_for(item).delete_replica()
        else:
            for key in storage().list_objects(f"logs/{item.pk}/"):
                storage().delete_object(key)
    with ctx.step("Remove the item"):
        name, vault = item.name, item.vault
        item.delete()
        event_record(vault=vault, kind="replication_disabled", message=f"Replication of {name} was disabled and its replica data removed.")
    return {}


# --- resynchronize --------------------------------------------------------------------------


def _resync_failed(job, error: str) -> None:
    ProtectedItem.objects.filter(pk=job.target_id, protection_state=P.RESYNCING).update(
        protection_state=P.RESYNC_REQUIRED, last_error=f"Resynchronization failed: {error}"[:2000]
    )


def _agent_phase(item: ProtectedItem) -> dict:
    agent = MobilityAgent.objects.filter(machine=item.machine_id).first()
    for status in (agent.last_status.get("items", []) if agent else []):
        if str(status.get("item_id")) == str(item.pk):
            return status
    return {}


def _resync_message(status: dict) -> str:
    """"Compared X of Y, sent Z" from the agent's status (its pass compares the source with
    the replica's own checksums)."""
    if status.get("waiting"):
        return f"The agent is {status['waiting']}."
    compared, total, sent = (status.get(k) for k in ("compared_bytes", "total_bytes", "sent_bytes"))
    if not all(isinstance(v, int) for v in (compared, total, sent)):
        return ""
    return f"Compared {size_text(compared)} of {size_text(total)}, sent {size_text(sent)}."


@job_handler(JobType.RESYNC, queue=queues.DATA, on_failure=_resync_failed)
def run_resync(ctx: JobContext) -> dict:
    item = _item(ctx)
    applied_before = item.applied_seq
    # The request this job serves, as the agent's assignment names it: the agent's status
    # says which request its pass belongs to, so a report of an earlier pass is never
    # taken for this one.
    request = item.state_changed_at.isoformat()

    def serving(status: dict) -> bool:
        return status.get("resync_id") == request

    with ctx.step("Start resynchronization"):
        # RESYNCING puts "resync" in the agent's assignment; wait until the agent takes it.
        started = time.monotonic()
        while not serving(_agent_phase(item)) and time.monotonic() - started < 120:
            item.refresh_from_db(fields=["protection_state"])
            if item.protection_state != P.RESYNCING:
                raise LifeboatError(f"{item.name} left resynchronization ({item.get_protection_state_display().lower()}).")
            ctx.pause(POLL)
        if not serving(_agent_phase(item)):
            raise LifeboatError(
                f"The mobility agent of {item.name} did not start the resynchronization within 2 minutes. "
                "Check that it runs and reaches the vault and its process server, then resynchronize again."
            )
    with ctx.step("Compare and send changed blocks"):
        while True:
            status = _agent_phase(item)
            item.refresh_from_db(fields=["protection_state"])
            if item.protection_state != P.RESYNCING:
                raise LifeboatError(f"{item.name} left resynchronization ({item.get_protection_state_display().lower()}).")
            if serving(status) and status.get("phase") == "delta" and isinstance(status.get("pass_done_seq"), int):
                break
            progress = status.get("progress")
            if serving(status) and isinstance(progress, (int, float)):
                ctx.progress(progress * 100, message=_resync_message(status) or None)
            ctx.pause(POLL)
        # The pass is over when the replica has applied its last batch, not when the agent
        # has sent it: that batch's seq is the target.
        target = int(status["pass_done_seq"])
        if target < applied_before:
            raise LifeboatError(
                f"The resynchronization pass of {item.name} ends at seq {target}, behind the {applied_before} "
                "the replica had already applied: the stream's numbering went back, so the replica cannot take "
                "the pass. Resynchronize again; if it happens again, check the process server's cache storage."
            )
    with ctx.step("Apply the resynchronization"):
        while True:
            item.refresh_from_db(fields=["applied_seq", "protection_state"])
            if item.applied_seq >= target:
                break
            if item.protection_state != P.RESYNCING:
                raise LifeboatError(f"{item.name} left resynchronization ({item.get_protection_state_display().lower()}) "
                                    f"before the replica applied the pass (seq {item.applied_seq} of {target}).")
            ctx.progress(0, message=f"The replica has applied seq {item.applied_seq} of {target}.")
            ctx.pause(POLL)
        try:
            protected_item_transition(item_id=item.pk, to_state=P.PROTECTED, operation="finish resynchronization", last_error="")
        except InvalidTransition:
            raise LifeboatError(f"{item.name} left resynchronization before it finished.") from None
        event_record(vault=item.vault, kind="resync_done",
                     message=f"Resynchronization of {item.name} is complete: the replica applied it through seq {target}.",
                     protected_item=item)
    return {"applied_seq": target}
