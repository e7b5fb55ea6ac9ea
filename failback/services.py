"""Failback: reprotect, fail over to on-premises, commit, re-enable replication.

Each operation checks everything it can before it writes anything (a refusal changes
nothing), moves the failback and the item under their compare-and-set transitions, and
starts its job (``failback.jobs``) in the same transaction.
"""
from __future__ import annotations

import logging

from django.db import transaction

from core.choices import JobState, JobType
from core.exceptions import Conflict, InvalidTransition, LifeboatError, NotFound, ValidationFailed
from core.jobs import job_create
from core.models import Job
from core.transitions import transition
from failback.models import Failback, FailbackLocation
from failback.transitions import FAILBACK, FailbackState
from recovery_plans.models import RecoveredVmKind
from recovery_plans.services import POINT_CHOICES, current_recovered_vm, recovery_point_choose
from replication.choices import Direction
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem
from replication.services import protected_item_transition
from vault.choices import Site
from vault.connectors import ConnectorError
from vault import discovery
from vault.models import MasterTargetServer, ProcessServer, RecoverySiteKind, VCenter
from vault.services import event_record

logger = logging.getLogger(__name__)

REPROTECT_STEPS = [
    "Check prerequisites", "Open the recovered VM as a source", "Create the returning replication",
    "Install the mobility agent", "Create replica disks", "Prepare the on-premises copy",
    "Send what differs", "Apply on-premises",
]
FAILBACK_STEPS = [
    "Shut down the recovered VM", "Replicate the last writes", "Prepare the recovery point",
    "Write the on-premises disks and verify them", "Power on the on-premises VM",
]
COMMIT_STEPS = ["Commit the failback"]
REENABLE_STEPS = [
    "Check prerequisites", "Point replication at the on-premises VM", "Install the mobility agent",
    "Remove the returning replication", "Compare with the replica and send what differs", "Apply the resynchronization",
]
FAILBACK_TYPES = ("planned", "unplanned")
FAILBACK_TYPE_CHOICES = [("planned", "Planned: no data loss"), ("unplanned", "Unplanned: a chosen point")]


def failback_transition(*, failback_id, to_state: str, operation: str, from_states=None, quiet: bool = False, **fields):
    return transition(FAILBACK, model=Failback, pk=failback_id, to_state=to_state, operation=operation,
                      from_states=from_states, quiet=quiet, **fields)


# --- selectors ------------------------------------------------------------------------------


def current_failback(*, item: ProtectedItem) -> Failback | None:
    """The item's failback under way (not completed), if any; for a returning item, the
    failback it belongs to."""
    if item.direction == Direction.RECOVERY_TO_PRIMARY:
        return Failback.objects.filter(returning_item=item).select_related(*_RELATED).first()
    return (Failback.objects.filter(item=item, state__in=FailbackState.ACTIVE)
            .select_related(*_RELATED).first())


_RELATED = ("vault", "item", "returning_item", "vcenter", "process_server", "master_target", "recovered_vm",
            "recovered_vm__site")


def failback_operations(*, item: ProtectedItem) -> list[tuple[str, str]]:
    """(operation, label) the item's failback allows now, for the portal's buttons."""
    if item.direction == Direction.RECOVERY_TO_PRIMARY:
        return []
    failback = current_failback(item=item)
    ops = []
    if item.protection_state == P.FAILOVER_COMMITTED and not _job_running(item, JobType.REPROTECT):
        ops.append(("reprotect", "Reprotect"))
    if failback is None:
        return ops
    running = _any_job_running(item)
    if failback.state == FailbackState.REPLICATING_BACK and not running:
        ops.append(("failback", "Fail over to on-premises"))
    if failback.state == FailbackState.FAILED_BACK and not running:
        ops.append(("commit", "Commit"))
    if failback.state == FailbackState.COMMITTED and not running:
        ops.append(("reenable", "Re-enable replication"))
    return ops


def _job_running(item: ProtectedItem, job_type: str) -> Job | None:
    return Job.objects.filter(type=job_type, target_type="protected_item", target_id=str(item.pk),
                              state__in=JobState.ACTIVE).first()


FAILBACK_JOBS = (JobType.REPROTECT, JobType.FAILBACK, JobType.FAILBACK_COMMIT, JobType.REENABLE_REPLICATION)


def _any_job_running(item: ProtectedItem) -> Job | None:
    return Job.objects.filter(type__in=FAILBACK_JOBS, target_type="protected_item", target_id=str(item.pk),
                              state__in=JobState.ACTIVE).first()


def _job(*, item: ProtectedItem, job_type: str, steps: list[str], params: dict, user) -> Job:
    return job_create(job_type=job_type, vault=item.vault, target_type="protected_item", target_id=str(item.pk),
                      target_name=item.name, params=params, steps=steps, created_by=user)


def _refuse(message: str, field: str | None = None) -> ValidationFailed:
    return ValidationFailed(message, extra={"fields": {field: [message]}} if field else {})


def _forward(item: ProtectedItem, operation: str) -> ProtectedItem:
    """The item the admin acts on: a returning item points at the item it brings home."""
    if item.direction == Direction.RECOVERY_TO_PRIMARY:
        owner = Failback.objects.filter(returning_item=item).select_related("item").first()
        if owner is None:
            raise _refuse(f"'{item.name}' replicates to on-premises but belongs to no failback.")
        return owner.item
    return item


# --- reprotect ------------------------------------------------------------------------------


def _by_pk_or_name(queryset, value, what: str, field: str):
    if value is None or value == "":
        return None
    if hasattr(value, "pk"):
        found = queryset.filter(pk=value.pk).first()
    else:
        text = str(value).strip()
        found = queryset.filter(pk=int(text)).first() if text.isascii() and text.isdigit() and len(text) < 12 else None
        found = found or queryset.filter(name=text).first()
    if found is None:
        known = ", ".join(queryset.values_list("name", flat=True)[:20]) or "none"
        raise _refuse(f"The vault has no {what} {value!s} (it has: {known}).", field)
    return found


def _recovery_process_server(item: ProtectedItem, process_server) -> ProcessServer:
    servers = ProcessServer.objects.filter(vault=item.vault, site=Site.RECOVERY)
    chosen = _by_pk_or_name(servers, process_server, "process server in the recovery site", "processServer")
    chosen = chosen or servers.order_by("name").first()
    if chosen is None:
        raise _refuse(
            "Reprotect needs a process server in the recovery site: the recovered VM's agent sends to it. Add one "
            "(site: Recovery) under Infrastructure, and run it there.", "processServer")
    return chosen


def _master_target(item: ProtectedItem, master_target) -> MasterTargetServer:
    servers = MasterTargetServer.objects.filter(vault=item.vault, site=Site.PRIMARY)
    chosen = _by_pk_or_name(servers, master_target, "master target server on-premises", "masterTarget")
    chosen = chosen or servers.order_by("name").first()
    if chosen is None:
        raise _refuse(
            "Reprotect needs a master target server on-premises: it writes the on-premises disks. Add one under "
            "Infrastructure.", "masterTarget")
    return chosen


def _alternate_checked(*, vcenter: VCenter, name: str, host: str, datastore: str, network: str) -> dict:
    """The alternate location, checked against what the vCenter has (400 with what exists)."""
    name = (name or "").strip()
    if not name or len(name) > 80 or any(c in name for c in "/\\%\x00") or any(ord(c) < 32 for c in name):
        raise _refuse("The new VM's name is 1-80 characters without / \\ % or control characters.", "targetName")
    try:
        with discovery.failback_target_for(vcenter) as target:
            hosts, datastores, networks = target.hosts(), target.datastores(), target.networks()
            if name in target.vm_names():
                raise _refuse(f"{vcenter.name} already has a VM named {name!r}; choose another name.", "targetName")
    except ConnectorError as exc:
        raise _refuse(f"The on-premises vCenter {vcenter.name} cannot be reached to check the alternate location: {exc}",
                      "vcenter") from None
    chosen = {}
    for field, value, have, what in (("targetHost", host, hosts, "host"), ("targetDatastore", datastore, datastores, "datastore"),
                                     ("targetNetwork", network, networks, "network")):
        value = (value or "").strip() or (have[0] if have else "")
        if value not in have:
            raise _refuse(f"{vcenter.name} has no {what} {value!r} (it has: {', '.join(have) or 'none'}).", field)
        chosen[field] = value
    return {"target_name": name, "target_host": chosen["targetHost"], "target_datastore": chosen["targetDatastore"],
            "target_network": chosen["targetNetwork"]}


def failback_reprotect(*, item: ProtectedItem, location: str = FailbackLocation.ORIGINAL, process_server=None,
                       master_target=None, vcenter=None, target_name: str = "", target_host: str = "",
                       target_datastore: str = "", target_network: str = "", user=None) -> tuple[Failback, Job]:
    """Replicate the failed-over VM back on-premises (the first step of failback).

    Original location: the returning replica is seeded from the original VM's disks and
    only the blocks that differ are sent. Alternate location: a new VM is made at the
    failover, so the replica starts empty and gets a full copy."""
    item = ProtectedItem.objects.select_related("vault", "machine", "machine__vcenter", "policy",
                                                "policy__failback_policy").get(pk=_forward(item, "reprotect").pk)
    if item.protection_state != P.FAILOVER_COMMITTED:
        raise InvalidTransition(
            f"Cannot reprotect '{item.name}' while it is {item.get_protection_state_display().lower()}: reprotect "
            "follows a committed failover.", current_state=item.protection_state, operation="reprotect")
    if location not in FailbackLocation.values:
        raise _refuse(f"'{location}' is not a failback location; use ORIGINAL or ALTERNATE.", "location")
    vm = current_recovered_vm(item=item, kind=RecoveredVmKind.FAILOVER)
    if vm is None:
        raise _refuse(f"'{item.name}' has no failed-over VM to replicate back.")
    if vm.site.kind != RecoverySiteKind.SIMULATED:
        raise _refuse(
            f"{vm.name} runs on the vSphere recovery site {vm.site.name}. Reprotect pushes the mobility agent into the "
            "recovered VM only on a simulated recovery site; on vSphere install the agent in the VM and protect it "
            "from that site's vCenter.")
    ps = _recovery_process_server(item, process_server)
    mt = _master_target(item, master_target)
    vcenters = VCenter.objects.filter(vault=item.vault)
    chosen_vcenter = _by_pk_or_name(vcenters, vcenter, "vCenter", "vcenter") or item.machine.vcenter
    target = {"target_name": "", "target_host": "", "target_datastore": "", "target_network": ""}
    if location == FailbackLocation.ORIGINAL:
        if item.machine.vcenter is None:
            raise _refuse(f"{item.machine.name} was registered by its agent without a vCenter: fail back to an "
                          "alternate location.", "location")
        if chosen_vcenter.pk != item.machine.vcenter_id:
            raise _refuse(f"The original VM {item.machine.name} is on {item.machine.vcenter.name}, not "
                          f"{chosen_vcenter.name}; an other vCenter is an alternate location.", "vcenter")
        if item.machine.missing:
            raise _refuse(f"The original VM {item.machine.name} is missing from {chosen_vcenter.name}: fail back to an "
                          "alternate location.", "location")
    else:
        if chosen_vcenter is None:
            raise _refuse("An alternate location needs the vCenter to make the new VM on.", "vcenter")
        target = _alternate_checked(vcenter=chosen_vcenter, name=target_name or f"{item.name}-failback",
                                    host=target_host, datastore=target_datastore, network=target_network)
    with transaction.atomic():
        failed = Failback.objects.select_for_update().filter(item=item, state=FailbackState.REPROTECT_FAILED).first()
        item = protected_item_transition(item_id=item.pk, to_state=P.REPROTECTING, operation="reprotect",
                                         from_states={P.FAILOVER_COMMITTED}, last_error="")
        fields = {"location": location, "vcenter": chosen_vcenter, "process_server": ps, "master_target": mt,
                  "recovered_vm": vm, "last_error": "", **target,
                  "target_vm_uuid": item.machine.instance_uuid if location == FailbackLocation.ORIGINAL else ""}
        if failed is not None:
            for k, v in fields.items():
                setattr(failed, k, v)
            failed.save()
            failback = failback_transition(failback_id=failed.pk, to_state=FailbackState.REPROTECTING, operation="reprotect")
        else:
            failback = Failback.objects.create(vault=item.vault, item=item, **fields)
        job = _job(item=item, job_type=JobType.REPROTECT, steps=REPROTECT_STEPS, user=user,
                   params={"failback": str(failback.pk)})
        where = ("its original VM" if location == FailbackLocation.ORIGINAL
                 else f"a new VM {target['target_name']} on {target['target_host']} / {target['target_datastore']}")
        event_record(vault=item.vault, kind="reprotect", protected_item=item, job=job,
                     message=f"Reprotect of {item.name}: {vm.name} replicates back through {ps.name} to {where} "
                             f"({chosen_vcenter.name}), written by {mt.name}.")
    return failback, job


# --- fail over to on-premises ---------------------------------------------------------------


def _active_failback(item: ProtectedItem, operation: str) -> Failback:
    failback = current_failback(item=item)
    if failback is None:
        raise InvalidTransition(f"Cannot {operation} '{item.name}': it has no failback under way (reprotect it first).",
                                current_state=item.protection_state, operation=operation)
    return failback


def failback_failover(*, item: ProtectedItem, failover_type: str = "planned", point: str = "latest",
                      recovery_point_id=None, shut_down: bool = True, user=None) -> tuple[Failback, Job]:
    """Fail over to on-premises: planned (the recovered VM shuts down, its last writes are
    applied on-premises: nothing lost) or unplanned (to the chosen point of the returning
    replica)."""
    item = _forward(item, "fail back")
    if failover_type not in FAILBACK_TYPES:
        raise _refuse(f"'{failover_type}' is not a failover type; use planned or unplanned.", "type")
    failback = _active_failback(item, "fail back")
    returning = failback.returning_item
    if failback.state != FailbackState.REPLICATING_BACK or returning is None:
        raise InvalidTransition(f"Cannot fail '{item.name}' back to on-premises: its failback is "
                                f"{failback.get_state_display().lower()}.", current_state=failback.state,
                                operation="fail back")
    if returning.protection_state != P.PROTECTED:
        raise InvalidTransition(
            f"Cannot fail '{item.name}' back yet: its replication to on-premises is "
            f"{returning.get_protection_state_display().lower()}.", current_state=returning.protection_state,
            operation="fail back")
    params = {"failback": str(failback.pk), "planned": failover_type == "planned", "shut_down": bool(shut_down)}
    if failover_type == "unplanned":
        if point not in POINT_CHOICES:
            raise _refuse(f"'{point}' is not a way to choose a recovery point; use one of {', '.join(POINT_CHOICES)}.",
                          "recoveryPoint")
        chosen = recovery_point_choose(item=returning, point=point, recovery_point_id=recovery_point_id)
        params.update(point_id=chosen.point_id, point_choice=point)
    with transaction.atomic():
        failback = failback_transition(failback_id=failback.pk, to_state=FailbackState.FAILBACK_IN_PROGRESS,
                                       operation="fail back", from_states={FailbackState.REPLICATING_BACK}, last_error="")
        protected_item_transition(item_id=returning.pk, to_state=P.FAILOVER_IN_PROGRESS, operation="fail back",
                                  from_states={P.PROTECTED}, last_error="")
        job = _job(item=item, job_type=JobType.FAILBACK, steps=FAILBACK_STEPS, user=user, params=params)
        event_record(vault=item.vault, kind="failback", protected_item=item, job=job,
                     message=f"{failover_type.capitalize()} failover of {item.name} to on-premises "
                             f"({failback.get_location_display().split(' (')[0].lower()}).")
    return failback, job


def failback_commit(*, item: ProtectedItem, user=None) -> tuple[Failback, Job]:
    item = _forward(item, "commit the failback of")
    failback = _active_failback(item, "commit the failback of")
    with transaction.atomic():
        running = _any_job_running(item)
        if running is not None:
            raise Conflict(f"Cannot commit the failback of '{item.name}' while {running.get_type_display().lower()} is "
                           "running.", code="invalid_state",
                           extra={"current_state": failback.state, "operation": "commit", "job": str(running.pk)})
        failback = failback_transition(failback_id=failback.pk, to_state=FailbackState.COMMITTED,
                                       operation="commit the failback of", from_states={FailbackState.FAILED_BACK})
        job = _job(item=item, job_type=JobType.FAILBACK_COMMIT, steps=COMMIT_STEPS, user=user,
                   params={"failback": str(failback.pk)})
    return failback, job


def failback_reenable(*, item: ProtectedItem, user=None) -> tuple[Failback, Job]:
    """Re-enable replication (reprotect again): the on-premises VM replicates to the recovery
    site, sending only what differs from the replica still there."""
    item = _forward(item, "re-enable replication of")
    failback = _active_failback(item, "re-enable replication of")
    with transaction.atomic():
        running = _any_job_running(item)
        if running is not None:
            raise Conflict(f"Cannot re-enable replication of '{item.name}' while {running.get_type_display().lower()} "
                           "is running.", code="invalid_state",
                           extra={"current_state": failback.state, "operation": "re-enable", "job": str(running.pk)})
        failback = failback_transition(failback_id=failback.pk, to_state=FailbackState.REENABLING,
                                       operation="re-enable replication of", from_states={FailbackState.COMMITTED},
                                       last_error="")
        job = _job(item=item, job_type=JobType.REENABLE_REPLICATION, steps=REENABLE_STEPS, user=user,
                   params={"failback": str(failback.pk)})
        event_record(vault=item.vault, kind="reenable", protected_item=item, job=job,
                     message=f"Re-enabling replication of {item.name} to the recovery site.")
    return failback, job


def failback_next(*, item: ProtectedItem, user=None, **options) -> tuple[Failback, Job]:
    """``reProtect`` as ASR means it: the next reprotect the item's state calls for — back
    on-premises after a committed failover, or to the recovery site again after a committed
    failback."""
    item = _forward(item, "reprotect")
    failback = current_failback(item=item)
    if failback is not None and failback.state == FailbackState.COMMITTED:
        return failback_reenable(item=item, user=user)
    return failback_reprotect(item=item, user=user, **options)


def failback_get(*, pk) -> Failback:
    failback = Failback.objects.filter(pk=pk).select_related(*_RELATED).first()
    if failback is None:
        raise NotFound("No such failback.")
    return failback


__all__ = [
    "COMMIT_STEPS", "FAILBACK_STEPS", "REENABLE_STEPS", "REPROTECT_STEPS", "LifeboatError",
    "current_failback", "failback_commit", "failback_failover", "failback_next", "failback_operations",
    "failback_reenable", "failback_reprotect", "failback_transition",
]
