"""Job handlers of failback: reprotect, fail over to on-premises, commit, re-enable.

The returning replication is a protected item of its own (direction recovery to primary),
so these jobs use replication's own steps for it: the agent's push install, replica disks,
the resynchronization by checksums (``replication.jobs``), the planned failover's shutdown
and drain and the recovery disks with their digests (``recovery_plans.jobs``). What is new
is the on-premises side: the master target seeds the returning replica from the original
disks, and at the failover writes the point into the original VM's disks (or a new VM's at
an alternate location) through ``vault.connectors.failback``, reading every disk back and
comparing its digest before the VM is powered on.
"""
from __future__ import annotations

import logging
import secrets
import time
from contextlib import contextmanager

from django.db import transaction
from django.utils import timezone

from core import queues
from core.choices import JobType
from core.exceptions import InvalidTransition, LifeboatError
from core.jobs import JobContext, job_handler
from core.models import Job
from core.text import size_text
from failback.models import Failback, FailbackLocation
from failback.services import failback_transition
from failback.transitions import FailbackState as F
from recovery_plans.jobs import (
    _drain,
    _hook,
    _progress,
    _recovery_disks,
    _remove_vm,
    _shut_down_step,
    undoes,
    verified_text,
)
from recovery_plans.models import RecoveredVm
from replication.choices import Direction
from replication.choices import ProtectionState as P
from replication.engine import applier_for, ns_to_dt, storage
from replication.jobs import (
    _agent_phase,
    _create_replica_disks,
    _initial_replication,
    _resync_apply,
    _resync_compare,
    _resync_start,
    agent_install,
)
from replication.models import MobilityAgent, ProtectedItem, ReplicaDisk
from replication.services import protected_item_delete, protected_item_transition
from vault.choices import VCenterKind
from vault.connectors import ConnectorError
from vault.connectors.base import POWERED_OFF, POWERED_ON
from vault.connectors.recovery import VerificationFailed
from vault import discovery
from vault.discovery import connector_for, machines_upsert
from vault.models import DiscoveredMachine, VCenter
from vault.services import event_record, vcenter_create, vcenter_password

logger = logging.getLogger(__name__)

SOURCE_USER = "administrator@recovery.sim.local"


def _failback(ctx: JobContext) -> Failback:
    return Failback.objects.select_related(
        "vault", "item", "item__machine", "item__machine__vcenter", "item__policy", "item__policy__failback_policy",
        "returning_item", "vcenter", "process_server", "master_target", "recovered_vm", "recovered_vm__site",
    ).get(pk=ctx.params["failback"])


def _returning(failback: Failback) -> ProtectedItem:
    item = ProtectedItem.objects.select_related(
        "vault", "machine", "machine__vcenter", "policy", "process_server", "recovery_site",
    ).prefetch_related("replica_disks").get(pk=failback.returning_item_id)
    return item


def _figures(failback: Failback, step: str, **values) -> None:
    with transaction.atomic():
        row = Failback.objects.select_for_update().get(pk=failback.pk)
        row.figures = {**row.figures, step: {**row.figures.get(step, {}), **values}}
        row.save(update_fields=["figures", "updated_at"])
        failback.figures = row.figures


@contextmanager
def _target_errors(failback: Failback, doing: str):
    """The on-premises side's errors, as sentences for the job."""
    try:
        yield
    except VerificationFailed as exc:
        raise LifeboatError(f"Verification failed: {exc}.") from None
    except ConnectorError as exc:
        raise LifeboatError(f"The on-premises vCenter {failback.vcenter.name} could not {doing}: {exc}") from None


# --- reprotect ------------------------------------------------------------------------------


def _undo_reprotect(job: Job, error: str) -> str:
    """The item stays committed where it is; the half-made returning replication is removed
    so that a retry starts clean. A sentence saying so."""
    failback = Failback.objects.filter(pk=job.params.get("failback"), state=F.REPROTECTING).select_related(
        "returning_item").first()
    if failback is None:
        return ""
    removed = ""
    returning = failback.returning_item
    if returning is not None:
        removed = _remove_returning(returning)
    failback_transition(failback_id=failback.pk, to_state=F.REPROTECT_FAILED, operation="record the failed reprotect of",
                        from_states={F.REPROTECTING}, quiet=True, last_error=f"Reprotect failed: {error}"[:2000],
                        returning_item=None)
    protected_item_transition(item_id=failback.item_id, to_state=P.FAILOVER_COMMITTED,
                              operation="roll back the failed reprotect of", from_states={P.REPROTECTING}, quiet=True,
                              last_error=f"Reprotect failed: {error}"[:2000])
    return f"{removed} The item stays failed over (committed); reprotect it again.".strip()


def _remove_returning(returning: ProtectedItem) -> str:
    """Delete the returning replication's replica and its item row (its jobs stay as history)."""
    try:
        if returning.replica_disks.exists():
            applier_for(returning).delete_replica()
        for key in storage().list_objects(f"logs/{returning.pk}/"):
            storage().delete_object(key)
    except Exception as exc:  # noqa: BLE001 - told in the sentence; the row stays so it can be retried
        logger.exception("removing the returning replica of %s", returning.pk)
        return f"Its returning replica could not be removed ({exc})."
    protected_item_delete(item_id=returning.pk)
    return "Its returning replication was removed."


def _check_reprotect(ctx: JobContext, failback: Failback) -> str:
    item, vm = failback.item, failback.recovered_vm
    if vm.removed_at is not None:
        raise LifeboatError(f"The failed-over VM {vm.name} was removed; there is nothing to replicate back.")
    with vm.site.connector() as site:
        info = site.get_vm(vm.vm_id)
    sizes = {d.index: d.size_bytes for d in info.disks}
    forward = {d.index: d for d in item.replica_disks.all() if d.removed_at is None}
    if sorted(sizes) != sorted(forward):
        raise LifeboatError(f"{vm.name} has disks {sorted(sizes)}, the item replicated disks {sorted(forward)}.")
    said = f"{vm.name} runs at {vm.site.name} with {len(sizes)} disk{'s' if len(sizes) != 1 else ''}."
    if failback.location == FailbackLocation.ORIGINAL:
        with _target_errors(failback, f"find {item.machine.name}"), discovery.failback_target_for(failback.vcenter) as target:
            onprem = target.vm(failback.target_vm_uuid)
            for d in forward.values():
                have = next((x for x in onprem.disks if x.key == d.source_disk_key), None)
                if have is None:
                    raise LifeboatError(f"The original VM {onprem.name} has no disk {d.source_disk_key} any more: fail "
                                        "back to an alternate location.")
                if have.size_bytes != sizes[d.index]:
                    raise LifeboatError(
                        f"Disk {d.source_disk_key} of {onprem.name} is {size_text(have.size_bytes)}, the recovered disk "
                        f"{size_text(sizes[d.index])}: fail back to an alternate location.")
            if onprem.power_state != POWERED_OFF:
                # It must not write while its disks are compared and, later, replaced.
                target.power_off(failback.target_vm_uuid)
                said += f" The original VM {onprem.name} was running and was powered off."
                event_record(vault=item.vault, kind="original_vm_powered_off", protected_item=item, job=ctx.job,
                             message=f"{onprem.name} was powered off: it must not run while failback prepares its disks.")
    ctx.summary(said)
    return said


def _source_vcenter(failback: Failback) -> VCenter:
    """The recovery site, opened as a simulated source site (its VMs can be protected back)."""
    site = failback.recovered_vm.site
    existing = VCenter.objects.filter(vault=failback.vault, kind=VCenterKind.SIMULATED, host=site.host).first()
    if existing is not None:
        with site.connector() as connector:
            connector.source_login(existing.username, vcenter_password(vcenter=existing))
        return existing
    password = secrets.token_urlsafe(18)
    with site.connector() as connector:
        connector.source_login(SOURCE_USER, password)
    name = f"{site.name} (failback source)"[:120]
    return vcenter_create(vault=failback.vault, name=name, host=site.host, username=SOURCE_USER, password=password,
                          kind=VCenterKind.SIMULATED)


def _open_source(ctx: JobContext, failback: Failback) -> int:
    vcenter = _source_vcenter(failback)
    with connector_for(vcenter) as site:
        machines_upsert(vcenter=vcenter, vms=site.discover().vms)
    machine = DiscoveredMachine.objects.filter(vault=failback.vault, instance_uuid=failback.recovered_vm.vm_id).first()
    if machine is None:
        raise LifeboatError(f"{failback.recovered_vm.name} was not found at {failback.recovered_vm.site.name}.")
    ctx.summary(f"{machine.name} is a source machine of {vcenter.name}.")
    return machine.pk


def _create_returning(ctx: JobContext, failback: Failback, machine_id: int) -> str:
    item = failback.item
    if failback.returning_item_id:
        return str(failback.returning_item_id)
    machine = DiscoveredMachine.objects.get(pk=machine_id)
    with transaction.atomic():
        stale = ProtectedItem.objects.filter(machine=machine).first()
        if stale is not None:
            raise LifeboatError(f"{machine.name} is already protected as another item ({stale.name}); disable that first.")
        returning = ProtectedItem.objects.create(
            vault=item.vault, machine=machine, policy=item.policy.failback_policy or item.policy,
            process_server=failback.process_server, name=item.name, direction=Direction.RECOVERY_TO_PRIMARY,
            # A replica seeded from the original disks is compared, never copied in full.
            initial_replication_progress=100 if failback.location == FailbackLocation.ORIGINAL else 0,
        )
        Failback.objects.filter(pk=failback.pk).update(returning_item=returning)
        failback.returning_item = returning
    ctx.summary(f"{item.name} replicates to on-premises through {failback.process_server.name} "
                f"({returning.policy.name}).")
    return str(returning.pk)


def _seed(ctx: JobContext, failback: Failback, returning: ProtectedItem) -> dict:
    """The master target reads the original VM's disks into the returning replica (on-premises,
    nothing on the wire), so the agent sends only the blocks that differ."""
    if failback.location != FailbackLocation.ORIGINAL:
        ctx.summary("A new VM is made at the alternate location: the returning replica starts empty and gets a full copy.")
        return {"seeded_bytes": 0}
    item = failback.item
    keys = {d.index: d.source_disk_key for d in item.replica_disks.all() if d.removed_at is None}
    started = time.monotonic()
    with _target_errors(failback, f"read the disks of {item.machine.name}"), \
            discovery.failback_target_for(failback.vcenter) as target:
        sources = {index: target.disk_source(failback.target_vm_uuid, key) for index, key in keys.items()}
        result = applier_for(returning).seed(sources)
    read = result.total_read
    seconds = round(time.monotonic() - started, 3)
    _figures(failback, "reprotect", seeded_bytes=read, seed_seconds=seconds)
    ctx.summary(f"{failback.master_target.name} read {size_text(read)} of {item.machine.name}'s disks into the returning "
                f"replica in {seconds:.1f} s (on-premises, nothing sent).")
    return {"seeded_bytes": read}


def _start_sending(ctx: JobContext, failback: Failback, returning: ProtectedItem) -> None:
    if returning.protection_state != P.ENABLING:
        return
    target = P.RESYNCING if failback.location == FailbackLocation.ORIGINAL else P.INITIAL_REPLICATION
    protected_item_transition(item_id=returning.pk, to_state=target, operation="start replicating back",
                              from_states={P.ENABLING})
    returning.refresh_from_db()
    ctx.memo["started_at"] = time.time()


def _sent_figures(item: ProtectedItem) -> dict:
    status = _agent_phase(item)
    return {k: status[k] for k in ("sent_bytes", "compared_bytes", "total_bytes") if isinstance(status.get(k), int)}


@job_handler(JobType.REPROTECT, queue=queues.DATA, on_failure=_hook(_undo_reprotect))
@undoes(_undo_reprotect)
def run_reprotect(ctx: JobContext) -> dict:
    failback = _failback(ctx)
    if failback.state != F.REPROTECTING:
        raise LifeboatError(f"The failback of {failback.item.name} is {failback.get_state_display().lower()}, not reprotecting.")
    ctx.run_step("Check prerequisites", _check_reprotect, ctx, failback)
    machine_id = ctx.run_step("Open the recovered VM as a source", _open_source, ctx, failback)
    ctx.run_step("Create the returning replication", _create_returning, ctx, failback, machine_id)
    failback.refresh_from_db()
    returning = _returning(failback)
    paths = ctx.run_step("Install the mobility agent", agent_install, ctx, returning)
    ctx.run_step("Create replica disks", _create_replica_disks, ctx, returning, paths)
    returning = _returning(failback)
    ctx.run_step("Prepare the on-premises copy", _seed, ctx, failback, returning)
    _start_sending(ctx, failback, returning)
    returning = _returning(failback)
    if failback.location == FailbackLocation.ORIGINAL:
        request = ctx.memo.setdefault("resync_id", returning.state_changed_at.isoformat())
        applied_before = ctx.memo.setdefault("applied_before", returning.applied_seq)

        def serving(status: dict) -> bool:
            return status.get("resync_id") == request

        def send() -> int:
            _resync_start(ctx, returning, serving)
            return _resync_compare(ctx, returning, serving, applied_before)

        target = ctx.run_step("Send what differs", send)
        ctx.run_step("Apply on-premises", _resync_apply, ctx, returning, target)
    else:
        # Through run_step: the initial copy below waits, and the job runs again from the
        # top, skipping what is done.
        ctx.run_step("Send what differs", _said, ctx, "Full copy: the alternate location has no disks yet.")
        ctx.run_step("Apply on-premises", _initial_replication, ctx, returning)
    returning = _returning(failback)
    if returning.protection_state != P.PROTECTED:
        raise LifeboatError(f"The returning replication of {returning.name} is "
                            f"{returning.get_protection_state_display().lower()}, not protected.")
    sent = _sent_figures(returning)
    if failback.location != FailbackLocation.ORIGINAL and "total_bytes" in sent:
        # The agent counts the bytes a resync sends, not those of an initial copy; the copy
        # to an alternate location is full: every block of the disks was sent.
        sent["sent_bytes"] = sent["total_bytes"]
    seconds = round(time.time() - ctx.job.created_at.timestamp(), 3)
    _figures(failback, "reprotect", seconds=seconds, **sent)
    failback_transition(failback_id=failback.pk, to_state=F.REPLICATING_BACK, operation="finish the reprotect of",
                        from_states={F.REPROTECTING}, last_error="")
    event_record(vault=failback.vault, kind="reprotected", protected_item=failback.item, job=ctx.job,
                 message=f"{failback.item.name} replicates back to on-premises"
                         + (f": {size_text(sent['sent_bytes'])} sent after comparing "
                            f"{size_text(sent.get('compared_bytes', 0))}." if "sent_bytes" in sent else "."))
    return {"returning_item": str(returning.pk), **sent}


# --- fail over to on-premises ---------------------------------------------------------------


def _undo_failback(job: Job, error: str) -> str:
    failback = Failback.objects.filter(pk=job.params.get("failback"), state=F.FAILBACK_IN_PROGRESS).select_related(
        "returning_item", "vcenter", "recovered_vm", "recovered_vm__site").first()
    if failback is None:
        return ""
    said = []
    if failback.location == FailbackLocation.ALTERNATE and failback.target_vm_uuid:
        try:
            with discovery.failback_target_for(failback.vcenter) as target:
                target.destroy_vm(failback.target_vm_uuid)
            said.append(f"The new VM {failback.target_name} was removed.")
            Failback.objects.filter(pk=failback.pk).update(target_vm_uuid="")
        except Exception as exc:  # noqa: BLE001 - told in the sentence
            said.append(f"The new VM {failback.target_name} could not be removed ({exc}); remove it by hand.")
    if job.params.get("planned") or job.params.get("shut_down"):
        vm = failback.recovered_vm
        try:
            with vm.site.connector() as site:
                site.power_on(vm.vm_id)
            RecoveredVm.objects.filter(pk=vm.pk).update(power_state=POWERED_ON)
            said.append(f"{vm.name} was powered on again at {vm.site.name}.")
        except Exception as exc:  # noqa: BLE001 - told in the sentence
            said.append(f"{vm.name} could not be powered on again ({exc}); power it on at {vm.site.name}.")
    if failback.returning_item_id:
        protected_item_transition(item_id=failback.returning_item_id, to_state=P.PROTECTED,
                                  operation="roll back the failed failback of", from_states={P.FAILOVER_IN_PROGRESS},
                                  quiet=True)
    failback_transition(failback_id=failback.pk, to_state=F.REPLICATING_BACK, operation="roll back the failback of",
                        from_states={F.FAILBACK_IN_PROGRESS}, quiet=True,
                        last_error=f"Failover to on-premises failed: {error}"[:2000])
    said.append("It goes on replicating to on-premises; fail back again when ready.")
    return " ".join(said)


def _write_onprem(ctx: JobContext, failback: Failback, disks) -> dict:
    item = failback.item
    by_index = {d.index: d for d in item.replica_disks.all()}
    progress = _progress(ctx)
    with _target_errors(failback, "write the on-premises disks"), discovery.failback_target_for(failback.vcenter) as target:
        if failback.location == FailbackLocation.ORIGINAL:
            target.power_off(failback.target_vm_uuid)
            restored = target.restore_vm(failback.target_vm_uuid, {by_index[d.index].source_disk_key: d for d in disks},
                                         progress=progress)
        else:
            restored = target.create_vm(name=failback.target_name, host=failback.target_host,
                                        datastore=failback.target_datastore, network=failback.target_network,
                                        disks=disks, progress=progress)
            Failback.objects.filter(pk=failback.pk).update(target_vm_uuid=restored.vm_uuid)
            failback.target_vm_uuid = restored.vm_uuid
    # The connector verified each disk it wrote; the job records what it read back.
    if failback.location == FailbackLocation.ORIGINAL:
        expected = {by_index[d.index].source_disk_key: d.expected.digest for d in disks}
        got = {d.key: d.digest for d in restored.disks}
    else:
        expected = {d.index: d.expected.digest for d in disks}
        got = {d.index: d.digest for d in restored.disks}
    for where, digest in expected.items():
        if got.get(where) != digest:
            raise LifeboatError(f"Disk {where} of {restored.name} does not match the returning replica: read back "
                                f"{got.get(where) or 'nothing'}, the point holds {digest}.")
    total = sum(d.size_bytes for d in restored.disks if d.digest)
    written = [d for d in restored.disks if d.digest]
    ctx.summary(f"{restored.name}: {verified_text(len(written), total)} on {failback.vcenter.name}.")
    return {"vm_uuid": restored.vm_uuid, "name": restored.name, "verified_bytes": total,
            "disks": [{"key": d.key, "index": d.index, "digest": d.digest, "location": d.location, "method": d.method}
                      for d in written]}


def _power_on_onprem(ctx: JobContext, failback: Failback) -> str:
    with _target_errors(failback, "power on the VM"), discovery.failback_target_for(failback.vcenter) as target:
        target.power_on(failback.target_vm_uuid)
        vm = target.vm(failback.target_vm_uuid)
    if vm.power_state != POWERED_ON:
        raise LifeboatError(f"{vm.name} was written but is {vm.power_state}, not running.")
    DiscoveredMachine.objects.filter(vault=failback.vault, instance_uuid=vm.vm_uuid).update(power_state=POWERED_ON)
    ctx.summary(f"{vm.name} runs on-premises again.")
    return vm.name


def _said(ctx: JobContext, sentence: str) -> str:
    ctx.summary(sentence)
    return sentence


@job_handler(JobType.FAILBACK, queue=queues.CONTROL, on_failure=_hook(_undo_failback))
@undoes(_undo_failback)
def run_failback(ctx: JobContext) -> dict:
    failback = _failback(ctx)
    if failback.state != F.FAILBACK_IN_PROGRESS:
        raise LifeboatError(f"The failback of {failback.item.name} is {failback.get_state_display().lower()}.")
    returning = _returning(failback)
    if ctx.params.get("planned") or ctx.params.get("shut_down"):
        source = ctx.run_step("Shut down the recovered VM", _shut_down_step, ctx, returning,
                              required=bool(ctx.params.get("planned")))
        RecoveredVm.objects.filter(pk=failback.recovered_vm_id).update(power_state=POWERED_OFF)
    else:
        source = ctx.run_step("Shut down the recovered VM", _said, ctx,
                              f"{failback.recovered_vm.name} was left as it is, as asked.")
    # Every step through run_step: a job that waits or is re-run after a crash starts again
    # from the top, skipping what is done.
    if ctx.params.get("planned"):
        point_id = ctx.run_step("Replicate the last writes", _drain, ctx, returning)
    else:
        point_id = ctx.params["point_id"]
        ctx.run_step("Replicate the last writes", _said, ctx, "Unplanned: the chosen point of the returning replica is used.")
    point, disks = _recovery_disks(returning, point_id)
    ctx.run_step("Prepare the recovery point", _said, ctx,
                 f"{len(disks)} disk{'s' if len(disks) != 1 else ''} at the point of "
                 f"{ns_to_dt(point.source_time_ns):%Y-%m-%d %H:%M:%S} UTC")
    written = ctx.run_step("Write the on-premises disks and verify them", _write_onprem, ctx, failback, disks)
    failback.target_vm_uuid = written["vm_uuid"]
    name = ctx.run_step("Power on the on-premises VM", _power_on_onprem, ctx, failback)
    try:
        protected_item_transition(item_id=returning.pk, to_state=P.FAILED_OVER, operation="finish the failback of",
                                  from_states={P.FAILOVER_IN_PROGRESS}, last_error="")
    except InvalidTransition:
        raise LifeboatError(f"The returning replication of {returning.name} left the failover before it finished.") from None
    seconds = round(time.time() - ctx.job.created_at.timestamp(), 3)
    _figures(failback, "failback", seconds=seconds, verified_bytes=written["verified_bytes"],
             point_time=ns_to_dt(point.source_time_ns).isoformat(), planned=bool(ctx.params.get("planned")))
    failback_transition(failback_id=failback.pk, to_state=F.FAILED_BACK, operation="finish the failback of",
                        from_states={F.FAILBACK_IN_PROGRESS}, last_error="")
    event_record(vault=failback.vault, kind="failed_back", protected_item=failback.item, job=ctx.job,
                 message=f"{failback.item.name} failed over to on-premises: {name} runs from the point of "
                         f"{ns_to_dt(point.source_time_ns):%Y-%m-%d %H:%M:%S} UTC "
                         f"({verified_text(len(written['disks']), written['verified_bytes'])}). {source} Commit it, "
                         "then re-enable replication.")
    return {"vm": name, "vm_uuid": written["vm_uuid"], "point_id": point.point_id,
            "point_time": ns_to_dt(point.source_time_ns).isoformat(), "verified_bytes": written["verified_bytes"],
            "disks": written["disks"], "source": source}


# --- commit ---------------------------------------------------------------------------------


def _undo_commit(job: Job, error: str) -> str:
    return ""


@job_handler(JobType.FAILBACK_COMMIT, queue=queues.CONTROL, on_failure=_hook(_undo_commit))
@undoes(_undo_commit)
def run_failback_commit(ctx: JobContext) -> dict:
    failback = _failback(ctx)

    def commit() -> str:
        if failback.returning_item_id:
            protected_item_transition(item_id=failback.returning_item_id, to_state=P.FAILOVER_COMMITTED,
                                      operation="commit the failback of", from_states={P.FAILED_OVER}, quiet=True)
        said = (f"The failback of {failback.item.name} is final: it runs on-premises. Re-enable replication to protect "
                "it again.")
        ctx.summary(said)
        return said

    said = ctx.run_step("Commit the failback", commit)
    event_record(vault=failback.vault, kind="failback_committed", protected_item=failback.item, job=ctx.job, message=said)
    return {"message": said}


# --- re-enable ------------------------------------------------------------------------------


def _undo_reenable(job: Job, error: str) -> str:
    failback = Failback.objects.filter(pk=job.params.get("failback"), state=F.REENABLING).first()
    if failback is None:
        return ""
    item = ProtectedItem.objects.filter(pk=failback.item_id).first()
    if item is not None and item.protection_state == P.REPROTECTING:
        failback_transition(failback_id=failback.pk, to_state=F.COMMITTED, operation="roll back the re-enable of",
                            from_states={F.REENABLING}, quiet=True, last_error=f"Re-enabling failed: {error}"[:2000])
        return "The failback stays committed; re-enable replication again."
    # The item replicates again and its own resynchronization repairs the rest.
    failback_transition(failback_id=failback.pk, to_state=F.COMPLETED, operation="end the re-enable of",
                        from_states={F.REENABLING}, quiet=True, last_error=f"Re-enabling failed: {error}"[:2000])
    return "The item replicates again; its resynchronization is retried like any other."


def _check_reenable(ctx: JobContext, failback: Failback) -> str:
    if not failback.target_vm_uuid:
        raise LifeboatError(f"The failback of {failback.item.name} has no on-premises VM.")
    with _target_errors(failback, "find the on-premises VM"), discovery.failback_target_for(failback.vcenter) as target:
        vm = target.vm(failback.target_vm_uuid)
    ctx.summary(f"{vm.name} is {vm.power_state} on {failback.vcenter.name}.")
    return vm.name


def _point_at_onprem(ctx: JobContext, failback: Failback) -> str:
    """An alternate location's new VM becomes the item's source machine; its disks take the
    replica disks' places in order."""
    item = failback.item
    if failback.location == FailbackLocation.ORIGINAL:
        ctx.summary(f"{item.machine.name} is the item's source, as before.")
        return item.machine.name
    with connector_for(failback.vcenter) as site:
        machines_upsert(vcenter=failback.vcenter, vms=site.discover().vms)
    machine = DiscoveredMachine.objects.filter(vault=failback.vault, instance_uuid=failback.target_vm_uuid).first()
    if machine is None:
        raise LifeboatError(f"{failback.target_name} was not found on {failback.vcenter.name}.")
    keys = [d.key for d in machine.disks.order_by("key")]
    rows = list(item.replica_disks.filter(removed_at__isnull=True).order_by("index"))
    if len(keys) != len(rows):
        raise LifeboatError(f"{machine.name} has {len(keys)} disks, the item replicates {len(rows)}.")
    with transaction.atomic():
        ProtectedItem.objects.filter(pk=item.pk).update(machine=machine)
        for row, key in zip(rows, keys):
            ReplicaDisk.objects.filter(pk=row.pk).update(source_disk_key=key)
    ctx.summary(f"{machine.name} on {failback.vcenter.name} is the item's source now.")
    return machine.name


def _install_paths(ctx: JobContext, item: ProtectedItem) -> dict:
    paths = agent_install(ctx, item)
    for row in item.replica_disks.filter(removed_at__isnull=True):
        path = paths.get(str(row.source_disk_key))
        if path is None:
            raise LifeboatError(f"The agent of {item.machine.name} has no disk {row.source_disk_key}.")
        ReplicaDisk.objects.filter(pk=row.pk).update(source_path=path[0], journal_dir=path[1] or "")
    return paths


def _end_returning(ctx: JobContext, failback: Failback) -> str:
    said = []
    returning = failback.returning_item
    if returning is not None:
        said.append(_remove_returning(returning))
        MobilityAgent.objects.filter(machine=returning.machine_id).update(last_status={})
    vm = failback.recovered_vm
    if vm.removed_at is None:
        removed, sentence = _remove_vm(vm, notes="Removed when replication was re-enabled: the VM runs on-premises again.")
        said.append(sentence)
        if not removed:
            logger.warning(sentence)
    text = " ".join(s for s in said if s)
    ctx.summary(text)
    return text


def _start_resync(ctx: JobContext, item: ProtectedItem) -> None:
    if item.protection_state == P.REPROTECTING:
        protected_item_transition(item_id=item.pk, to_state=P.RESYNCING, operation="re-enable replication of",
                                  from_states={P.REPROTECTING}, last_error="", resync_attempts=0, resync_retry_at=None)


@job_handler(JobType.REENABLE_REPLICATION, queue=queues.DATA, on_failure=_hook(_undo_reenable))
@undoes(_undo_reenable)
def run_reenable(ctx: JobContext) -> dict:
    failback = _failback(ctx)
    if failback.state != F.REENABLING:
        raise LifeboatError(f"The failback of {failback.item.name} is {failback.get_state_display().lower()}.")
    ctx.run_step("Check prerequisites", _check_reenable, ctx, failback)
    ctx.run_step("Point replication at the on-premises VM", _point_at_onprem, ctx, failback)
    item = ProtectedItem.objects.select_related("vault", "machine", "machine__vcenter", "policy",
                                                "process_server").get(pk=failback.item_id)
    ctx.run_step("Install the mobility agent", _install_paths, ctx, item)
    ctx.run_step("Remove the returning replication", _end_returning, ctx, failback)
    _start_resync(ctx, item)
    item.refresh_from_db()
    request = ctx.memo.setdefault("resync_id", item.state_changed_at.isoformat())
    applied_before = ctx.memo.setdefault("applied_before", item.applied_seq)

    def serving(status: dict) -> bool:
        return status.get("resync_id") == request

    def send() -> int:
        _resync_start(ctx, item, serving)
        return _resync_compare(ctx, item, serving, applied_before)

    target = ctx.run_step("Compare with the replica and send what differs", send)
    ctx.run_step("Apply the resynchronization", _resync_apply, ctx, item, target)
    sent = _sent_figures(item)
    _figures(failback, "reenable", seconds=round(time.time() - ctx.job.created_at.timestamp(), 3), **sent)
    failback_transition(failback_id=failback.pk, to_state=F.COMPLETED, operation="finish the failback of",
                        from_states={F.REENABLING}, last_error="")
    event_record(vault=failback.vault, kind="reenabled", protected_item=item, job=ctx.job,
                 message=f"{item.name} is protected again, primary to recovery"
                         + (f": {size_text(sent['sent_bytes'])} sent after comparing {size_text(sent.get('compared_bytes', 0))}."
                            if "sent_bytes" in sent else "."))
    return {"item": str(item.pk), **sent, "finished_at": timezone.now().isoformat()}
