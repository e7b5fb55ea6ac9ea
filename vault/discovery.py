"""Discovery: list a VMware endpoint's VMs and their disks, and upsert them into the vault.

Runs as a job. New machines appear, changed ones update (power state, host, disks, a
resized disk), vanished ones are marked missing (never deleted: a protected machine must
stay visible). A fixed handful of queries whatever the inventory's size. Disks added,
resized or removed are announced with ``vault.signals.machine_disks_changed`` once the
upsert is committed (replication keeps protected items' replica disks in step).
"""
from __future__ import annotations

import logging
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from core.choices import JobState, JobType
from core.exceptions import Conflict, LifeboatError
from core.jobs import JobContext, job_create, job_handler
from core.models import Job
from vault.choices import MachineSource, VCenterKind
from vault.connectors import ConnectorError, open_connector
from vault.connectors.sites import open_failback_target
from vault.models import DiscoveredDisk, DiscoveredMachine, VCenter
from vault.services import vcenter_password
from vault.signals import machine_disks_changed

logger = logging.getLogger(__name__)

MACHINE_FIELDS = ("name", "power_state", "guest_os", "host", "datacenter", "cluster")
# Rows per INSERT or UPDATE statement: an inventory of a thousand VMs takes one of each.
BATCH = 1000


def connector_for(vcenter: VCenter):
    """An unconnected connector for the endpoint, from the vault's stored settings."""
    if vcenter.kind == VCenterKind.SIMULATED:
        return open_connector("simulated", data_dir=vcenter.host, user=vcenter.username, password=vcenter_password(vcenter=vcenter))
    return open_connector(
        "vcenter",
        host=vcenter.host,
        port=vcenter.port,
        user=vcenter.username,
        password=vcenter_password(vcenter=vcenter),
        allow_untrusted=vcenter.allow_untrusted,
        thumbprint=vcenter.thumbprint or None,
    )


def failback_target_for(vcenter: VCenter):
    """An unconnected failback target (the on-premises side of a failback) for the
    endpoint, from the vault's stored settings."""
    if vcenter.kind == VCenterKind.SIMULATED:
        return open_failback_target("simulated", data_dir=vcenter.host, user=vcenter.username,
                                    password=vcenter_password(vcenter=vcenter))
    return open_failback_target(
        "vcenter",
        host=vcenter.host,
        port=vcenter.port,
        user=vcenter.username,
        password=vcenter_password(vcenter=vcenter),
        allow_untrusted=vcenter.allow_untrusted,
        thumbprint=vcenter.thumbprint or None,
    )


def vcenter_discover(*, vcenter: VCenter, user=None) -> Job:
    """Start discovery of a vCenter unless one is already running for it."""
    with transaction.atomic():
        VCenter.objects.select_for_update().get(pk=vcenter.pk)
        running = Job.objects.filter(
            type=JobType.DISCOVERY, target_type="vcenter", target_id=str(vcenter.pk), state__in=JobState.ACTIVE
        ).first()
        if running is not None:
            raise Conflict(f"Discovery of {vcenter.name} is already running.", code="already_running", extra={"job": str(running.id)})
        return job_create(
            job_type=JobType.DISCOVERY,
            vault=vcenter.vault,
            target_type="vcenter",
            target_id=str(vcenter.pk),
            target_name=vcenter.name,
            steps=["Connect", "Read inventory", "Update machines"],
            created_by=user,
        )


def _record_discovery_failure(job: Job, error: str) -> None:
    VCenter.objects.filter(pk=job.target_id).update(last_discovery_error=error)


@job_handler(JobType.DISCOVERY, on_failure=_record_discovery_failure)
def run_discovery(ctx: JobContext) -> dict:
    vcenter = VCenter.objects.select_related("vault").get(pk=ctx.job.target_id)
    connector = connector_for(vcenter)
    try:
        with ctx.step("Connect"):
            connector.connect()
        try:
            with ctx.step("Read inventory"):
                inventory = connector.discover()
        finally:
            connector.close()
    except ConnectorError as exc:
        # The connector's sentence is what the admin acts on (a wrong password, a host that
        # cannot be reached, an untrusted certificate): not an "unexpected error".
        raise LifeboatError(f"{str(exc).rstrip('.')}.") from None
    with ctx.step("Update machines"):
        summary = machines_upsert(vcenter=vcenter, vms=inventory.vms)
    VCenter.objects.filter(pk=vcenter.pk).update(last_discovery_at=timezone.now(), last_discovery_error="")
    return summary


def machines_upsert(*, vcenter: VCenter, vms) -> dict:
    """Upsert discovered VMs of one endpoint in a constant number of queries."""
    now = timezone.now()
    with transaction.atomic():
        # This endpoint's machines, and any the vault already knows by the same UUID (a VM
        # registered by its agent before its vCenter was added, or moved between endpoints):
        # those are adopted, never duplicated.
        uuids = [vm.instance_uuid for vm in vms]
        existing = {
            m.instance_uuid: m
            for m in DiscoveredMachine.objects.filter(vault=vcenter.vault_id).filter(Q(vcenter=vcenter) | Q(instance_uuid__in=uuids))
        }
        new, changed = [], []
        seen = set()
        for vm in vms:
            seen.add(vm.instance_uuid)
            machine = existing.get(vm.instance_uuid)
            values = {f: getattr(vm, f) or "" for f in MACHINE_FIELDS}
            if machine is None:
                new.append(DiscoveredMachine(vault_id=vcenter.vault_id, vcenter=vcenter, source=MachineSource.VCENTER,
                                             instance_uuid=vm.instance_uuid, last_seen_at=now, **values))
            elif machine.missing or machine.vcenter_id != vcenter.pk or any(getattr(machine, f) != v for f, v in values.items()):
                for f, v in values.items():
                    setattr(machine, f, v)
                machine.missing, machine.updated_at = False, now
                machine.vcenter, machine.source = vcenter, MachineSource.VCENTER
                changed.append(machine)
        DiscoveredMachine.objects.bulk_create(new, batch_size=BATCH)
        # Only what changed is rewritten; every machine seen is stamped in one statement.
        DiscoveredMachine.objects.bulk_update(changed, [*MACHINE_FIELDS, "missing", "updated_at", "vcenter", "source"], batch_size=BATCH)
        DiscoveredMachine.objects.filter(vcenter=vcenter, instance_uuid__in=seen).update(last_seen_at=now)
        vanished = [m.pk for u, m in existing.items() if u not in seen and not m.missing and m.vcenter_id == vcenter.pk]
        DiscoveredMachine.objects.filter(pk__in=vanished).update(missing=True, updated_at=now)

        by_uuid = {m.instance_uuid: m for m in DiscoveredMachine.objects.filter(vcenter=vcenter, instance_uuid__in=seen).only("id", "instance_uuid")}
        current = {(d.machine_id, d.key): d for d in DiscoveredDisk.objects.filter(machine__vcenter=vcenter, machine__instance_uuid__in=seen)}
        disk_new, disk_changed, keep = [], [], set()
        shape: list[dict] = []  # disks added, resized or removed
        for vm in vms:
            machine_id = by_uuid[vm.instance_uuid].pk
            for disk in vm.disks:
                keep.add((machine_id, disk.key))
                row = current.get((machine_id, disk.key))
                values = dict(label=disk.label or "", capacity_bytes=disk.capacity_bytes, backing_file=disk.backing_file or "", datastore=disk.datastore or "")
                if row is None:
                    disk_new.append(DiscoveredDisk(machine_id=machine_id, key=disk.key, **values))
                    shape.append({"machine_id": machine_id, "key": disk.key, "old": None, "new": disk.capacity_bytes})
                elif any(getattr(row, f) != v for f, v in values.items()):
                    if row.capacity_bytes != disk.capacity_bytes:
                        shape.append({"machine_id": machine_id, "key": disk.key, "old": row.capacity_bytes,
                                      "new": disk.capacity_bytes})
                    for f, v in values.items():
                        setattr(row, f, v)
                    disk_changed.append(row)
        DiscoveredDisk.objects.bulk_create(disk_new, batch_size=BATCH)
        DiscoveredDisk.objects.bulk_update(disk_changed, ["label", "capacity_bytes", "backing_file", "datastore"], batch_size=BATCH)
        gone = [d.pk for k, d in current.items() if k not in keep]
        DiscoveredDisk.objects.filter(pk__in=gone).delete()
        shape += [{"machine_id": d.machine_id, "key": d.key, "old": d.capacity_bytes, "new": None}
                  for k, d in current.items() if k not in keep]
        if shape:
            transaction.on_commit(lambda: machine_disks_changed.send(sender=DiscoveredDisk, changes=shape))
    return {
        "machines_found": len(seen),
        "machines_new": len(new),
        "machines_updated": len(changed),
        "machines_missing": len(vanished),
        "disks_new": len(disk_new),
        "disks_changed": len(disk_changed),
        "disks_removed": len(gone),
    }


def vcenters_due_for_discovery(*, now=None) -> list[VCenter]:
    now = now or timezone.now()
    due = []
    for vc in VCenter.objects.all():
        if vc.last_discovery_at is None or vc.last_discovery_at + timedelta(minutes=vc.discovery_interval_minutes) <= now:
            due.append(vc)
    return due
