"""A vault's worth of everything the portal and the API list, grown a few rows at a time, so
that a test can compare the queries of a page at 5 rows and at 50 or more (query counts
that grow with the rows are N+1 queries)."""
from __future__ import annotations

import itertools
from datetime import timedelta

from django.utils import timezone

from core.choices import JobState, JobType
from core.models import Job
from recovery_plans.models import RecoveredVm
from replication.choices import ProtectionState, RecoveryPointType
from replication.models import ProtectedItem, RecoveryPoint
from replication.services import protected_item_set_recovery
from tests.factories import (
    DiskFactory,
    MachineFactory,
    PolicyFactory,
    ProcessServerFactory,
    ProtectedItemFactory,
    RecoverySiteFactory,
    ReplicaDiskFactory,
)
from vault.choices import Health, Severity
from vault.models import VCenter
from vault.services import alert_raise, event_record

_n = itertools.count()
STATES = [ProtectionState.PROTECTED, ProtectionState.INITIAL_REPLICATION, ProtectionState.RESYNC_REQUIRED,
          ProtectionState.FAILED_OVER]
HEALTHS = [Health.HEALTHY, Health.WARNING, Health.CRITICAL]
SEVERITIES = [Severity.INFO, Severity.WARNING, Severity.CRITICAL]


class Fleet:
    """The shared parts of one vault's fleet: two policies, two process servers, a vCenter
    and a recovery site; ``grow`` adds rows that use all of them."""

    def __init__(self, vault, *, user=None) -> None:
        self.vault, self.user = vault, user
        self.policies = [PolicyFactory(vault=vault), PolicyFactory(vault=vault)]
        self.servers = [ProcessServerFactory(vault=vault), ProcessServerFactory(vault=vault)]
        self.vcenter = VCenter.objects.create(vault=vault, name=f"vc-{next(_n)}", kind="simulated", host="/tmp/none",
                                              username="u", password_encrypted="x")
        self.site = RecoverySiteFactory(vault=vault)
        self.items: list[ProtectedItem] = []

    def grow(self, n: int) -> None:
        """n more of each: protected items (with disks, a recovery site and its networks, two
        recovery points, some with a recovered VM), discovered machines not protected, jobs,
        alerts (some acknowledged, some resolved) and events."""
        now = timezone.now()
        for _ in range(n):
            i = next(_n)
            machine = MachineFactory(vault=self.vault, vcenter=self.vcenter if i % 2 else None, last_seen_at=now,
                                     host=f"esx-{i % 3}", power_state="poweredOn" if i % 4 else "poweredOff")
            DiskFactory(machine=machine)
            item = ProtectedItemFactory(
                vault=self.vault, machine=machine, policy=self.policies[i % 2], process_server=self.servers[i % 2],
                rpo_seconds=None if i % 7 == 0 else 30 + (i * 37) % 900, health=HEALTHS[i % 3],
                protection_state=ProtectionState.PROTECTED)
            protected_item_set_recovery(item=item, recovery_site=self.site)
            ProtectedItem.objects.filter(pk=item.pk).update(protection_state=STATES[i % len(STATES)])
            item.refresh_from_db()
            ReplicaDiskFactory(item=item, index=0)
            ReplicaDiskFactory(item=item, index=1, source_disk_key=2001)
            points = [RecoveryPoint.objects.create(item=item, point_id=f"fleet-{i}-{k}", seq=k + 1,
                                                   time=now - timedelta(minutes=5 * k + i % 5),
                                                   type=RecoveryPointType.APP_CONSISTENT if k else RecoveryPointType.CRASH_CONSISTENT)
                      for k in range(2)]
            if item.protection_state == ProtectionState.FAILED_OVER:
                RecoveredVm.objects.create(
                    item=item, kind="FAILOVER", site=item.recovery_site, network=item.recovery_network, vm_id=f"vm-{i}",
                    name=item.name, power_state="poweredOn", point_id=points[0].point_id, point_time=points[0].time,
                    point_type=points[0].type)
            MachineFactory(vault=self.vault, vcenter=self.vcenter, last_seen_at=now - timedelta(hours=i % 24))
            job = Job.objects.create(
                vault=self.vault, type=[JobType.ENABLE_REPLICATION, JobType.RESYNC, JobType.TEST_FAILOVER][i % 3],
                state=[JobState.SUCCEEDED, JobState.FAILED, JobState.RUNNING][i % 3], target_type="protecteditem",
                target_id=str(item.pk), target_name=item.name, progress=(i * 13) % 101, created_by=self.user,
                steps=[{"name": "Prepare", "state": "SUCCEEDED", "progress": 100}])
            alert, _ = alert_raise(vault=self.vault, key=f"rpo:{item.pk}", kind="rpo_exceeded", severity=SEVERITIES[i % 3],
                                   message=f"RPO of {item.name} is high", protected_item=item,
                                   process_server=self.servers[i % 2], job=job)
            if i % 2:
                alert.acknowledged, alert.acknowledged_by = True, self.user
                alert.save()
            if i % 5 == 0:
                alert.state = "RESOLVED"
                alert.save()
            event_record(vault=self.vault, kind=["initial_replication_done", "resync_failed"][i % 2],
                         severity=SEVERITIES[(i + 1) % 3], message=f"Something happened to {item.name}",
                         protected_item=item, job=job)
            self.items.append(item)
