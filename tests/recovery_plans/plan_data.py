"""Test data for the recovery plan editor: a vault with three protected items mapped to a
simulated recovery site, and an item of another vault."""
from __future__ import annotations

from django.utils import timezone

from replication.choices import ProtectionState as P
from replication.models import ProtectedItem
from tests.factories import PolicyFactory, ProcessServerFactory, ProtectedItemFactory, VaultFactory
from vault.models import RecoveryNetwork, RecoverySite


def recovery_site(vault, name="site-east"):
    site = RecoverySite.objects.create(vault=vault, name=name, kind="simulated", host=f"/var/lib/lifeboat/{name}")
    for net, purpose in [("recovery-net", "RECOVERY"), ("test-net", "TEST"), ("dmz-net", "RECOVERY"), ("lab-net", "TEST")]:
        RecoveryNetwork.objects.create(site=site, name=net, purpose=purpose)
    return site


def protected_items(vault, names=("db-01", "app-01", "web-01"), site=None) -> list[ProtectedItem]:
    """Items that can fail over: protected, with a recovery point, mapped to ``site``."""
    policy = PolicyFactory(vault=vault)
    server = ProcessServerFactory(vault=vault)
    items = []
    for name in names:
        item = ProtectedItemFactory(vault=vault, policy=policy, process_server=server, machine__name=name,
                                    recovery_site=site)
        ProtectedItem.objects.filter(pk=item.pk).update(protection_state=P.PROTECTED,
                                                        last_recovery_point_at=timezone.now())
        item.refresh_from_db()
        items.append(item)
    return items


def stranger_item() -> ProtectedItem:
    """A protected item of another vault."""
    return ProtectedItemFactory(vault=VaultFactory(), machine__name="elsewhere-01")
