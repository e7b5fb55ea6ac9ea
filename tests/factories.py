"""factory_boy factories. Objects with invariants are built through their services."""
from __future__ import annotations

import factory

from replication.models import ProtectedItem, ReplicaDisk
from vault import services
from vault.models import DiscoveredDisk, DiscoveredMachine, ProcessServer


class VaultFactory(factory.Factory):
    class Meta:
        model = dict

    name = factory.Sequence(lambda n: f"vault-{n}")
    passphrase = "correct horse battery staple"

    @classmethod
    def _create(cls, model_class, **kwargs):
        return services.vault_create(**kwargs)

    _build = _create


class PolicyFactory(factory.Factory):
    class Meta:
        model = dict

    vault = factory.SubFactory(VaultFactory)
    name = factory.Sequence(lambda n: f"policy-{n}")

    @classmethod
    def _create(cls, model_class, **kwargs):
        return services.policy_create(**kwargs)

    _build = _create


class ProcessServerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ProcessServer

    vault = factory.SubFactory(VaultFactory)
    name = factory.Sequence(lambda n: f"ps-{n}")
    host = "127.0.0.1"


class MachineFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DiscoveredMachine

    vault = factory.SubFactory(VaultFactory)
    instance_uuid = factory.Faker("uuid4")
    name = factory.Sequence(lambda n: f"vm-{n:04d}")
    power_state = "poweredOn"
    guest_os = "ubuntu64Guest"
    source = "agent"


class DiskFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DiscoveredDisk

    machine = factory.SubFactory(MachineFactory)
    key = factory.Sequence(lambda n: 2000 + n)
    capacity_bytes = 8 * 1024 * 1024


class ProtectedItemFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ProtectedItem

    vault = factory.SubFactory(VaultFactory)
    machine = factory.SubFactory(MachineFactory, vault=factory.SelfAttribute("..vault"))
    policy = factory.SubFactory(PolicyFactory, vault=factory.SelfAttribute("..vault"))
    process_server = factory.SubFactory(ProcessServerFactory, vault=factory.SelfAttribute("..vault"))
    name = factory.SelfAttribute("machine.name")


class ReplicaDiskFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ReplicaDisk

    item = factory.SubFactory(ProtectedItemFactory)
    index = 0
    source_disk_key = 2000
    capacity_bytes = 8 * 1024 * 1024
    storage_name = factory.LazyAttribute(lambda o: f"{o.item.pk}-{o.index}")


class RecoverySiteFactory(factory.Factory):
    """A simulated recovery site with a recovery and a test network (through its service)."""

    class Meta:
        model = dict

    vault = factory.SubFactory(VaultFactory)
    name = factory.Sequence(lambda n: f"recovery-site-{n}")
    host = factory.Sequence(lambda n: f"/tmp/lifeboat-tests/recovery-site-{n}")
    networks = factory.LazyFunction(lambda: [("recovery-net", "RECOVERY"), ("test-net", "TEST")])

    @classmethod
    def _create(cls, model_class, **kwargs):
        return services.recovery_site_create(**kwargs)

    _build = _create


import datetime as _dt  # noqa: E402  (this file is appended to)

_POINT_EPOCH = _dt.datetime(2026, 11, 30, tzinfo=_dt.timezone.utc)


class RecoveryPointFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = "replication.RecoveryPoint"

    item = factory.SubFactory(ProtectedItemFactory)
    seq = factory.Sequence(lambda n: n + 1)
    point_id = factory.LazyAttribute(lambda o: f"replica-{o.seq:012d}")
    time = factory.LazyAttribute(lambda o: _POINT_EPOCH + _dt.timedelta(seconds=o.seq))
    type = "crash_consistent"
