"""Job handlers of replication: enable, disable, resynchronize, switch process server."""
from __future__ import annotations

import logging
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from core import queues
from core.choices import JobType
from core.exceptions import LifeboatError
from core.jobs import JobContext, job_handler
from core.text import size_text
from mobility.transport import ProcessServerClient, RetryPolicy, TransportError
from replication.agents import agent_push
from replication.dataplane.apply import stream_floor
from replication.choices import ProtectionState as P
from replication.engine import applier_for, storage
from replication.models import MobilityAgent, ProtectedItem, ReplicaDisk
from replication.push_install import push_credentials_write
from replication.scheduling import resync_failure_recorded
from replication.services import protected_item_delete, protected_item_transition
from replication.tokens import item_token
from replication.waits import initial_slot_wait_key, item_wait_key, machine_wait_key
from vault.choices import MachineSource, VCenterKind
from vault.discovery import connector_for
from vault.models import ProcessServer
from vault.services import event_record

logger = logging.getLogger(__name__)
# A waiting step looks again this often at the latest, even if no event wakes it.
CHECK_AFTER = 5.0


def _item(ctx: JobContext) -> ProtectedItem:
    return ProtectedItem.objects.select_related("vault", "machine", "machine__vcenter", "policy", "process_server").get(pk=ctx.job.target_id)


# --- enable ---------------------------------------------------------------------------------


def _enable_failed(job, error: str) -> None:
    protected_item_transition(item_id=job.target_id, to_state=P.ENABLE_FAILED, operation="record the failed enable of",
                              from_states={P.ENABLING}, quiet=True, last_error=error[:2000])


def simulated_site_for(item: ProtectedItem):
    return connector_for(item.machine.vcenter)


def agent_install(ctx: JobContext, item: ProtectedItem) -> dict[str, list[str]]:
    """Make sure the machine has an agent; returns {disk key: [source path, journal dir]}
    (JSON: the step's result is kept between runs of the job)."""
    machine = item.machine
    vcenter = machine.vcenter
    if vcenter is not None and vcenter.kind == VCenterKind.SIMULATED:
        site = simulated_site_for(item)
        agent = agent_push(machine=machine)
        paths = {str(d.key): [site.disk_path(machine.instance_uuid, d.key), site.journal_dir(machine.instance_uuid, d.key)]
                 for d in machine.disks.all()}
        # The credentials list the disks: the agent reads no other (replication/push_install.py).
        push_credentials_write(machine=machine, agent=agent, paths=paths)
        ctx.summary("Installed by Lifeboat on the simulated site.")
        return paths
    if machine.source == MachineSource.AGENT:
        ctx.summary("The agent registered this machine itself.")
        return {str(d.key): [d.backing_file, ""] for d in machine.disks.all()}
    # A vCenter VM: the agent is installed by hand on it and registers with the vault.
    command = (
        f"python -m mobility register --config-url {settings.LIFEBOAT_CONFIG_URL} --passphrase-file <file holding the "
        f"vault passphrase, or - to read it from standard input> --instance-uuid {machine.instance_uuid} "
        "--disk <key>=<device path> ... && python -m mobility run"
    )
    agent = MobilityAgent.objects.filter(machine=machine).first()
    if agent is not None:
        paths = {str(int(d["key"])): [d["path"], ""] for d in agent.disks}
        missing = [d.key for d in machine.disks.all() if str(d.key) not in paths]
        if missing:
            raise LifeboatError(f"The agent on {machine.name} did not report disks {missing}; re-register it with every disk.")
        ctx.summary(f"The agent on {machine.name} registered with {len(paths)} disk{'s' if len(paths) != 1 else ''}.")
        return paths
    if ctx.deadline_passed("agent registration", settings.LIFEBOAT_AGENT_INSTALL_TIMEOUT):
        raise LifeboatError(
            f"No mobility agent registered for {machine.name} within {settings.LIFEBOAT_AGENT_INSTALL_TIMEOUT // 60} minutes. "
            f"Install it on the VM and run: {command}"
        )
    # The agent's registration wakes the job (machine_wait_key); the periodic look is a backstop.
    ctx.wait(f"Waiting for the mobility agent to register. Install it on the VM: {command}",
             key=machine_wait_key(machine.pk), check_after=30)


def _take_initial_slot(ctx: JobContext, item: ProtectedItem) -> None:
    """Start the initial copy when the process server has a free slot (batched copies);
    otherwise wait until an initial copy on it ends."""
    limit = settings.LIFEBOAT_MAX_CONCURRENT_INITIAL
    with transaction.atomic():
        ProcessServer.objects.select_for_update().get(pk=item.process_server_id)
        running = ProtectedItem.objects.filter(process_server=item.process_server_id, protection_state=P.INITIAL_REPLICATION).count()
        if running < limit:
            protected_item_transition(item_id=item.pk, to_state=P.INITIAL_REPLICATION, operation="start initial replication")
            return
    ctx.wait(f"Waiting for a free initial-replication slot on {item.process_server.name} ({running} of {limit} in use).",
             key=initial_slot_wait_key(item.process_server_id), check_after=CHECK_AFTER, progress=0)


def _check_prerequisites(item: ProtectedItem) -> int:
    disks = list(item.machine.disks.all())
    if not disks:
        raise LifeboatError(f"{item.machine.name} has no disks to replicate.")
    if item.machine.missing:
        raise LifeboatError(f"{item.machine.name} is missing from its vCenter's inventory.")
    storage().list_objects(f"logs/{item.pk}/")  # target storage answers
    return len(disks)


def _create_replica_disks(ctx: JobContext, item: ProtectedItem, paths: dict[str, list[str]]) -> int:
    disks = sorted(item.machine.disks.all(), key=lambda d: d.key)
    total = 0
    for index, disk in enumerate(disks):
        path, journal = paths[str(disk.key)]
        rd, _ = ReplicaDisk.objects.update_or_create(
            item=item, index=index,
            defaults={"source_disk_key": disk.key, "label": disk.label, "capacity_bytes": disk.capacity_bytes,
                      "storage_name": f"{item.pk}-disk{index}", "source_path": path, "journal_dir": journal or ""},
        )
        if not storage().disk_exists(rd.storage_name):
            storage().create_disk(rd.storage_name, rd.capacity_bytes)
        total += rd.capacity_bytes
        ctx.progress(100 * (index + 1) / len(disks))
    ctx.summary(f"Created {len(disks)} replica disk{'s' if len(disks) != 1 else ''} ({size_text(total)}).")
    return len(disks)


def _initial_replication(ctx: JobContext, item: ProtectedItem) -> None:
    """Wait (without a worker) until apply has the whole initial copy; every apply pass of
    the item wakes the job to show its percent."""
    if item.protection_state == P.ENABLING:
        _take_initial_slot(ctx, item)
    item.refresh_from_db(fields=["protection_state", "initial_replication_progress", "last_error"])
    if item.protection_state == P.PROTECTED:
        total = sum(d.capacity_bytes for d in item.replica_disks.all())
        ctx.summary(f"Initial copy complete: {size_text(total)} on {item.replica_disks.count()} disk(s) replicated.")
        return
    if item.protection_state != P.INITIAL_REPLICATION:
        raise LifeboatError(f"Initial replication stopped: {item.name} is now {item.get_protection_state_display().lower()}. {item.last_error}".strip())
    ctx.wait(f"{item.initial_replication_progress}% copied", key=item_wait_key(item.pk), check_after=CHECK_AFTER * 2,
             progress=item.initial_replication_progress)


# Every step runs again safely (a step that finished is kept, the others look again at what
# they find), so a job whose worker died is run again on another one (core.jobs.jobs_reap).
@job_handler(JobType.ENABLE_REPLICATION, queue=queues.DATA, on_failure=_enable_failed, resumable=True)
def run_enable(ctx: JobContext) -> dict:
    item = _item(ctx)
    if not ctx.done("Check prerequisites") and item.protection_state != P.ENABLING:
        raise LifeboatError(f"{item.name} is {item.get_protection_state_display().lower()}, not being enabled.")
    disks = ctx.run_step("Check prerequisites", _check_prerequisites, item)
    paths = ctx.run_step("Install the mobility agent", agent_install, ctx, item)
    ctx.run_step("Create replica disks", _create_replica_disks, ctx, item, paths)
    ctx.run_step("Initial replication", _initial_replication, ctx, item)
    with ctx.step("Start delta replication"):
        event_record(vault=item.vault, kind="protected", message=f"{item.name} is protected.", protected_item=item)
        ctx.summary("Delta replication is on.")
    return {"disks": disks}


# --- disable --------------------------------------------------------------------------------


def _disable_failed(job, error: str) -> None:
    # The item stays DISABLING (its data may be half removed); the portal offers "Disable again".
    ProtectedItem.objects.filter(pk=job.target_id).update(
        last_error=f"Disabling failed: {error} Disable it again to finish."[:2000])


@job_handler(JobType.DISABLE_REPLICATION, queue=queues.CONTROL, on_failure=_disable_failed)
def run_disable(ctx: JobContext) -> dict:
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
        protected_item_delete(item_id=item.pk)
        event_record(vault=vault, kind="replication_disabled", message=f"Replication of {name} was disabled and its replica data removed.")
    return {}


# --- resynchronize --------------------------------------------------------------------------


def _resync_failed(job, error: str) -> None:
    # The backoff lives beside the sweep honouring it (replication.scheduling).
    resync_failure_recorded(item_id=job.target_id, error=error)


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


def _left_resync(item: ProtectedItem, extra: str = "") -> LifeboatError:
    return LifeboatError(f"{item.name} left resynchronization ({item.get_protection_state_display().lower()}){extra}.")


def _resync_start(ctx: JobContext, item: ProtectedItem, serving) -> None:
    """RESYNCING puts "resync" in the agent's assignment; wait until the agent takes it."""
    if serving(_agent_phase(item)):
        ctx.summary("The mobility agent started the resynchronization pass.")
        return
    if item.protection_state != P.RESYNCING:
        raise _left_resync(item)
    if ctx.deadline_passed("agent takes the resync", 120):
        raise LifeboatError(
            f"The mobility agent of {item.name} did not start the resynchronization within 2 minutes. "
            "Check that it runs and reaches the vault and its process server, then resynchronize again."
        )
    ctx.wait("Waiting for the mobility agent to take the resynchronization.", key=machine_wait_key(item.machine_id),
             check_after=CHECK_AFTER)


def _resync_compare(ctx: JobContext, item: ProtectedItem, serving, applied_before: int) -> int:
    """The agent compares and sends; returns the seq of the pass's last batch."""
    status = _agent_phase(item)
    if item.protection_state != P.RESYNCING:
        raise _left_resync(item)
    if not (serving(status) and status.get("phase") == "delta" and isinstance(status.get("pass_done_seq"), int)):
        progress = status.get("progress")
        percent = progress * 100 if serving(status) and isinstance(progress, (int, float)) else None
        ctx.wait((_resync_message(status) if serving(status) else "") or "The agent compares the source with the replica.",
                 key=machine_wait_key(item.machine_id), check_after=CHECK_AFTER, progress=percent)
    # The pass is over when the replica has applied its last batch, not when the agent
    # has sent it: that batch's seq is the target.
    target = int(status["pass_done_seq"])
    if target < applied_before:
        raise LifeboatError(
            f"The resynchronization pass of {item.name} ends at seq {target}, behind the {applied_before} "
            "the replica had already applied: the stream's numbering went back, so the replica cannot take "
            "the pass. Resynchronize again; if it happens again, check the process server's cache storage."
        )
    ctx.summary(_resync_message(status) or f"The agent sent the pass through seq {target}.")
    return target


def _resync_apply(ctx: JobContext, item: ProtectedItem, target: int) -> None:
    if item.applied_seq < target:
        if item.protection_state != P.RESYNCING:
            raise _left_resync(item, f" before the replica applied the pass (seq {item.applied_seq} of {target})")
        ctx.wait(f"The replica has applied seq {item.applied_seq} of {target}.", key=item_wait_key(item.pk),
                 check_after=CHECK_AFTER)
    moved = protected_item_transition(item_id=item.pk, to_state=P.PROTECTED, operation="finish resynchronization",
                                      from_states={P.RESYNCING}, quiet=True, last_error="")
    if moved is None:
        raise LifeboatError(f"{item.name} left resynchronization before it finished.")
    event_record(vault=item.vault, kind="resync_done",
                 message=f"Resynchronization of {item.name} is complete: the replica applied it through seq {target}.",
                 protected_item=item)
    ctx.summary(f"The replica applied the pass through seq {target}; {item.name} is protected.")


@job_handler(JobType.RESYNC, queue=queues.DATA, on_failure=_resync_failed, resumable=True)
def run_resync(ctx: JobContext) -> dict:
    item = _item(ctx)
    # The request this job serves, as the agent's assignment names it: the agent's status
    # says which request its pass belongs to, so a report of an earlier pass is never
    # taken for this one. Both are taken at the job's first run and kept.
    request = ctx.memo.setdefault("resync_id", item.state_changed_at.isoformat())
    applied_before = ctx.memo.setdefault("applied_before", item.applied_seq)

    def serving(status: dict) -> bool:
        return status.get("resync_id") == request

    ctx.run_step("Start resynchronization", _resync_start, ctx, item, serving)
    target = ctx.run_step("Compare and send changed blocks", _resync_compare, ctx, item, serving, applied_before)
    ctx.run_step("Apply the resynchronization", _resync_apply, ctx, item, target)
    return {"applied_seq": target}


# --- switch process server ------------------------------------------------------------------

# How long each wait of a switch may last before the job gives up (the item stays where it is).
SWITCH_STEP_TIMEOUT = 600


def _item_position(server: ProcessServer, item: ProtectedItem) -> dict | None:
    """What ``server`` says of the item's stream (``GET /v1/items/<id>``, with the item's token,
    pinning the server's certificate), or None if it does not answer now."""
    client = ProcessServerClient(server.url, thumbprint=server.thumbprint, timeout=15)
    try:
        return RetryPolicy(max_attempts=2, max_delay=1.0).run(
            lambda: client.item_position(item_id=item.pk, token=item_token(item=item)))
    except (TransportError, ValueError) as e:
        logger.warning("item %s: process server %s (%s) does not answer: %s", item.pk, server.name, server.url, e)
        return None
    finally:
        client.close()


def _switch_deadline(ctx: JobContext, what: str, message: str) -> None:
    if ctx.deadline_passed(what, SWITCH_STEP_TIMEOUT):
        raise LifeboatError(f"{message} within {SWITCH_STEP_TIMEOUT // 60} minutes; the item stays on its process "
                            "server. Switch again once that is fixed.")


def _new_server_answers(ctx: JobContext, item: ProtectedItem, new: ProcessServer) -> None:
    if _item_position(new, item) is None:
        _switch_deadline(ctx, "new server answers", f"{new.name} ({new.url}) did not answer for {item.name}")
        ctx.wait(f"Waiting for {new.name} ({new.url}) to answer.", check_after=CHECK_AFTER)
    ctx.summary(f"{new.name} answers at {new.url}.")


def _agent_stopped(ctx: JobContext, item: ProtectedItem, old: ProcessServer) -> None:
    """While the job runs the agent's assignment leaves the item out (replication.agents):
    the agent closes the item's runner once every batch in flight is answered. A heartbeat
    received after the job started that no longer lists the item says it has done so."""
    paused_at = ctx.memo.setdefault("paused_at", timezone.now().isoformat())
    agent = MobilityAgent.objects.filter(machine=item.machine_id).first()
    if agent is None:
        raise LifeboatError(f"{item.name} has no mobility agent any more; nothing ships it to a process server.")
    listed = {str(s.get("item_id")) for s in (agent.last_status or {}).get("items", [])}
    if agent.last_heartbeat_at and agent.last_heartbeat_at > datetime.fromisoformat(paused_at) and (
            str(item.pk) not in listed):
        ctx.summary(f"The mobility agent stopped sending {item.name} to {old.name}.")
        return
    _switch_deadline(ctx, "agent stops", f"The mobility agent of {item.name} did not confirm that it stopped sending")
    ctx.wait(f"Waiting for the mobility agent to stop sending {item.name} to {old.name}.",
             key=machine_wait_key(item.machine_id), check_after=CHECK_AFTER)


def _old_server_drained(ctx: JobContext, item: ProtectedItem, old: ProcessServer) -> int:
    """Every batch the old server acknowledged is in storage: the new one, which continues
    after what storage holds, goes on right after them. Returns that seq."""
    position = _item_position(old, item)
    if position is not None:
        acked, uploaded = position["acked_seq"], int(position.get("uploaded_seq", -1))
        floor = stream_floor(storage(), item.pk)
        if not position.get("receiving_batches") and uploaded >= acked and floor >= acked:
            ctx.summary(f"{old.name} uploaded everything it acknowledged: storage holds the stream through seq "
                        f"{floor}.")
            return floor
        waiting = f"{old.name} is uploading what it acknowledged (seq {uploaded} of {acked} in storage)."
    else:
        waiting = f"Waiting for {old.name} ({old.url}) to answer: it holds the item's acknowledged batches."
    _switch_deadline(ctx, "old server drains", f"{old.name} did not show every batch it acknowledged for {item.name} "
                                               "in storage")
    ctx.wait(waiting, check_after=2)


def _switch(ctx: JobContext, item: ProtectedItem, old: ProcessServer, new: ProcessServer, through: int) -> None:
    # Asked now, the new server lines the item up with what storage holds (seq ``through``).
    if _item_position(new, item) is None:
        _switch_deadline(ctx, "new server answers again", f"{new.name} ({new.url}) did not answer for {item.name}")
        ctx.wait(f"Waiting for {new.name} ({new.url}) to answer.", check_after=CHECK_AFTER)
    moved = ProtectedItem.objects.filter(pk=item.pk, process_server=old).update(process_server=new)
    if not moved and not ProtectedItem.objects.filter(pk=item.pk, process_server=new).exists():
        raise LifeboatError(f"{item.name} was moved to another process server meanwhile; nothing was changed.")
    event_record(vault=item.vault, kind="process_server_switched", protected_item=item,
                 message=f"{item.name} now replicates through {new.name} (was {old.name}), going on after seq "
                         f"{through}: no data is copied again.")
    ctx.summary(f"{item.name} replicates through {new.name} from seq {through + 1}.")


def _agent_resumed(ctx: JobContext, item: ProtectedItem, new: ProcessServer, through: int) -> int:
    """The agent ships to the new server: it acknowledged a batch after ``through``."""
    status = _agent_phase(item)
    acked = status.get("acked_seq")
    if isinstance(acked, int) and acked > through:
        ctx.summary(f"{new.name} acknowledged the item's batches through seq {acked}.")
        return acked
    _switch_deadline(ctx, "agent resumes", f"The mobility agent of {item.name} did not send to {new.name}")
    ctx.wait(f"Waiting for the mobility agent to send to {new.name}.", key=machine_wait_key(item.machine_id),
             check_after=CHECK_AFTER)


@job_handler(JobType.CHANGE_PROCESS_SERVER, queue=queues.DATA, resumable=True)
def run_change_process_server(ctx: JobContext) -> dict:
    """Switch process server without copying anything again: the agent is told nothing of the
    item while the old server uploads what it acknowledged, then the new server takes the
    stream up right after what storage holds (docs/DESIGN-NOTES.md, "Switching process
    server")."""
    item = _item(ctx)
    old = ProcessServer.objects.get(pk=ctx.params["from"])
    new = ProcessServer.objects.get(pk=ctx.params["process_server"])
    ctx.run_step("Check the new process server", _new_server_answers, ctx, item, new)
    ctx.run_step("Pause shipping", _agent_stopped, ctx, item, old)
    through = ctx.run_step("Drain the old process server", _old_server_drained, ctx, item, old)
    ctx.run_step("Switch", _switch, ctx, item, old, new, through)
    acked = ctx.run_step("Resume shipping", _agent_resumed, ctx, item, new, through)
    return {"process_server": new.pk, "from_seq": through + 1, "acked_seq": acked}
