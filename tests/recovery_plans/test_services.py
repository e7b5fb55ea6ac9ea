"""Recovery services against the real database: recovery sites and their networks, the item's
recovery mapping, choosing a recovery point, and every recovery operation from every state
(allowed: the state moves and a job is queued; refused: 409 and nothing changes)."""
from __future__ import annotations

import itertools

import pytest
from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils import timezone

from core.choices import JobState, JobType
from core.exceptions import Conflict, InvalidTransition, ValidationFailed
from core.models import Job
from recovery_plans import services
from recovery_plans.models import RecoveredVm
from replication.choices import ProtectionState as P
from replication.choices import TestFailoverState as T
from replication.models import ProtectedItem
from replication.services import protected_item_set_recovery
from tests.factories import ProtectedItemFactory, RecoveryPointFactory, RecoverySiteFactory, VaultFactory
from vault import services as vault_services
from vault.models import RecoveryNetwork, RecoverySite, VCenter

pytestmark = pytest.mark.django_db


def _item(state: str = P.PROTECTED, *, site=True, vcenter=True, points: int = 3) -> ProtectedItem:
    item = ProtectedItemFactory()
    if vcenter:
        vc = VCenter.objects.create(vault=item.vault, name=f"vc-{item.pk.hex[:6]}", kind="simulated", host="/tmp/none",
                                    username="u", password_encrypted="x")
        item.machine.vcenter = vc
        item.machine.save()
    if site:
        protected_item_set_recovery(item=item, recovery_site=RecoverySiteFactory(vault=item.vault))
    for _ in range(points):
        RecoveryPointFactory(item=item)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=state)
    return ProtectedItem.objects.get(pk=item.pk)


def _vm(item: ProtectedItem, kind: str = "FAILOVER", *, site=None, network=None) -> RecoveredVm:
    point = item.recovery_points.order_by("-seq").first()
    return RecoveredVm.objects.create(
        item=item, kind=kind, site=site or item.recovery_site, network=network or item.recovery_network, vm_id="vm-1",
        name=item.name,
        power_state="poweredOn", point_id=point.point_id, point_time=point.time, point_type=point.type,
    )


def _jobs(item) -> int:
    return Job.objects.filter(target_id=str(item.pk)).count()


# --- recovery sites -------------------------------------------------------------------------


def test_recovery_site_with_its_networks():
    vault = VaultFactory()
    site = vault_services.recovery_site_create(
        vault=vault, name="dr", host="/srv/dr", networks=[{"name": "prod", "purpose": "RECOVERY"}, ("isolated", "TEST")]
    )
    assert sorted(site.networks.values_list("name", "purpose")) == [("isolated", "TEST"), ("prod", "RECOVERY")]
    assert site.password_encrypted == ""


@pytest.mark.parametrize("networks,message", [
    ([("prod", "RECOVERY")], "at least one isolated test network"),
    ([("isolated", "TEST")], "at least one recovery network"),
    ([], "at least one recovery network and one isolated test network"),
    ([("a", "RECOVERY"), ("a", "TEST")], "listed twice"),
    ([("a", "RECOVERY"), ("b", "PRODUCTION")], "not a network purpose"),
])
def test_recovery_site_needs_a_recovery_and_a_test_network(networks, message):
    vault = VaultFactory()
    with pytest.raises(ValidationFailed, match=message):
        vault_services.recovery_site_create(vault=vault, name="dr", host="/srv/dr", networks=networks)
    assert not RecoverySite.objects.exists() and not RecoveryNetwork.objects.exists()


def test_recovery_site_bad_settings_change_nothing():
    vault = VaultFactory()
    nets = [("prod", "RECOVERY"), ("iso", "TEST")]
    with pytest.raises(DjangoValidationError) as err:
        vault_services.recovery_site_create(vault=vault, name="dr", host="relative/dir", networks=nets)
    assert "absolute path" in str(err.value)
    with pytest.raises(ValidationFailed, match="needs a password"):
        vault_services.recovery_site_create(vault=vault, name="vs", kind="vsphere", host="vc.example", networks=nets)
    with pytest.raises(DjangoValidationError) as err:
        vault_services.recovery_site_create(vault=vault, name="vs", kind="vsphere", host="vc.example", username="u",
                                            password="p", networks=nets)
    assert set(err.value.message_dict) == {"datacenter", "datastore", "placement"}
    assert not RecoverySite.objects.exists()
    vault_services.recovery_site_create(vault=vault, name="dr", host="/srv/dr", networks=nets)
    with pytest.raises(Conflict):
        vault_services.recovery_site_create(vault=vault, name="dr", host="/srv/other", networks=nets)
    assert RecoverySite.objects.count() == 1


def test_vsphere_site_password_is_encrypted():
    site = vault_services.recovery_site_create(
        vault=VaultFactory(), name="vs", kind="vsphere", host="vc.example", username="admin", password="s3cret!",
        datacenter="DC0", datastore="LocalDS_0", placement="DC0_C0", networks=[("VM Network", "RECOVERY"), ("iso", "TEST")],
    )
    assert "s3cret" not in site.password_encrypted
    assert vault_services.recovery_site_password(site=site) == "s3cret!"


def test_site_in_use_cannot_be_deleted():
    item = _item()
    site, network = item.recovery_site, item.recovery_network
    with pytest.raises(Conflict, match=item.name):
        vault_services.recovery_site_delete(site=site)
    protected_item_set_recovery(item=item, recovery_site=None)
    _vm(item, site=site, network=network)  # a VM recovered from the item still runs there
    with pytest.raises(Conflict, match="recovered VMs"):
        vault_services.recovery_site_delete(site=site)
    RecoveredVm.objects.update(removed_at=timezone.now())
    with pytest.raises(Conflict, match="record it"):
        vault_services.recovery_site_delete(site=site)  # the record of past drills keeps it
    RecoveredVm.objects.all().delete()
    vault_services.recovery_site_delete(site=site)
    assert not RecoverySite.objects.filter(pk=site.pk).exists()


def test_networks_can_be_added_and_removed_but_not_the_last_of_a_purpose():
    site = RecoverySiteFactory()
    extra = vault_services.recovery_network_create(site=site, name="test-net-2", purpose="TEST")
    with pytest.raises(Conflict):
        vault_services.recovery_network_create(site=site, name="test-net-2", purpose="TEST")
    vault_services.recovery_network_delete(network=extra)
    with pytest.raises(ValidationFailed, match="last isolated test network"):
        vault_services.recovery_network_delete(network=site.networks.get(purpose="TEST"))
    assert site.networks.count() == 2


def test_mapped_network_cannot_be_removed():
    item = _item()
    vault_services.recovery_network_create(site=item.recovery_site, name="dr-2", purpose="RECOVERY")
    with pytest.raises(Conflict, match="mapped"):
        vault_services.recovery_network_delete(network=item.recovery_network)


# --- the item's recovery mapping ------------------------------------------------------------


def test_mapping_defaults_to_the_first_network_of_each_purpose():
    item = _item(site=False)
    site = RecoverySiteFactory(vault=item.vault)
    item = protected_item_set_recovery(item=item, recovery_site=site)
    assert (item.recovery_network.name, item.test_network.name) == ("recovery-net", "test-net")
    other = vault_services.recovery_network_create(site=site, name="iso-2", purpose="TEST")
    item = protected_item_set_recovery(item=item, recovery_site=site, test_network=other)
    assert item.test_network == other


def test_mapping_refuses_foreign_and_wrong_purpose_networks():
    item = _item()
    other_site = RecoverySiteFactory(vault=item.vault)
    with pytest.raises(ValidationFailed, match="not a network of the item's recovery site"):
        protected_item_set_recovery(item=item, recovery_site=item.recovery_site,
                                    recovery_network=other_site.networks.get(purpose="RECOVERY"))
    with pytest.raises(ValidationFailed, match="isolated test network, not a recovery network"):
        protected_item_set_recovery(item=item, recovery_site=item.recovery_site, recovery_network=item.test_network)
    foreign = RecoverySiteFactory()
    with pytest.raises(ValidationFailed, match="another vault"):
        protected_item_set_recovery(item=item, recovery_site=foreign)
    fresh = ProtectedItem.objects.get(pk=item.pk)
    assert (fresh.recovery_site, fresh.recovery_network, fresh.test_network) == (item.recovery_site, item.recovery_network, item.test_network)


@pytest.mark.parametrize("state", [P.FAILOVER_IN_PROGRESS, P.FAILED_OVER, P.FAILOVER_COMMITTED])
def test_mapping_is_frozen_while_a_recovered_vm_exists(state):
    item = _item(state)
    with pytest.raises(InvalidTransition):
        protected_item_set_recovery(item=item, recovery_site=None)
    assert ProtectedItem.objects.get(pk=item.pk).recovery_site_id == item.recovery_site_id


# --- choosing a recovery point --------------------------------------------------------------


def test_latest_and_latest_processed_are_the_newest_point():
    item = _item(points=0)
    old = RecoveryPointFactory(item=item, type="app_consistent")
    newest = RecoveryPointFactory(item=item)
    assert services.recovery_point_choose(item=item, point="latest") == newest
    assert services.recovery_point_choose(item=item, point="latest_processed") == newest
    assert services.recovery_point_choose(item=item, point="latest_app_consistent") == old


def test_custom_point_by_id_or_data_plane_id_of_this_item_only():
    item = _item()
    point = item.recovery_points.order_by("seq").first()
    assert services.recovery_point_choose(item=item, point="custom", recovery_point_id=str(point.pk)) == point
    assert services.recovery_point_choose(item=item, point="custom", recovery_point_id=point.point_id) == point
    other = RecoveryPointFactory()
    with pytest.raises(ValidationFailed, match="has no recovery point"):
        services.recovery_point_choose(item=item, point="custom", recovery_point_id=str(other.pk))
    with pytest.raises(ValidationFailed, match="needs recoveryPointId"):
        services.recovery_point_choose(item=item, point="custom")


def test_no_point_of_the_asked_kind_is_a_clear_400():
    item = _item(points=0)
    with pytest.raises(ValidationFailed, match="no recovery point yet"):
        services.recovery_point_choose(item=item, point="latest")
    RecoveryPointFactory(item=item)
    with pytest.raises(ValidationFailed, match="no app-consistent recovery point yet"):
        services.recovery_point_choose(item=item, point="latest_app_consistent")
    with pytest.raises(ValidationFailed, match="not a way to choose"):
        services.recovery_point_choose(item=item, point="oldest")


# --- every operation from every state -------------------------------------------------------


def _run(op: str, item: ProtectedItem):
    if op == "test_failover":
        return services.protected_item_test_failover(item=item, point="latest")
    if op == "test_failover_cleanup":
        return services.protected_item_test_failover_cleanup(item=item, notes="drill ok")
    if op == "planned_failover":
        return services.protected_item_planned_failover(item=item)
    if op == "unplanned_failover":
        return services.protected_item_unplanned_failover(item=item, point="latest")
    if op == "apply_recovery_point":
        return services.protected_item_apply_recovery_point(item=item, point="latest")
    if op == "failover_commit":
        return services.protected_item_failover_commit(item=item)
    raise AssertionError(op)


# operation -> (allowed protection states, test failover state needed, protection state after, test state after, job type)
OPERATIONS = {
    "test_failover": (P.TEST_FAILOVER_ALLOWED, T.NONE, None, T.IN_PROGRESS, JobType.TEST_FAILOVER),
    "test_failover_cleanup": (frozenset(P), T.SUCCEEDED, None, T.CLEANING_UP, JobType.TEST_FAILOVER_CLEANUP),
    "planned_failover": ({P.PROTECTED}, None, P.FAILOVER_IN_PROGRESS, None, JobType.PLANNED_FAILOVER),
    "unplanned_failover": ({P.PROTECTED}, None, P.FAILOVER_IN_PROGRESS, None, JobType.UNPLANNED_FAILOVER),
    "apply_recovery_point": ({P.FAILED_OVER}, None, P.FAILED_OVER, None, JobType.APPLY_RECOVERY_POINT),
    "failover_commit": ({P.FAILED_OVER}, None, P.FAILOVER_COMMITTED, None, JobType.FAILOVER_COMMIT),
}
CELLS = [
    (op, state, tstate)
    for op in OPERATIONS
    for state, tstate in itertools.product([s.value for s in P], [T.NONE, T.SUCCEEDED] if op.startswith("test") else [T.NONE])
]


@pytest.mark.parametrize("op,state,tstate", CELLS)
def test_every_operation_in_every_state(op, state, tstate):
    allowed_states, needs_t, to_state, to_t, job_type = OPERATIONS[op]
    item = _item(state)
    ProtectedItem.objects.filter(pk=item.pk).update(test_failover_state=tstate)
    if state in (P.FAILED_OVER, P.FAILOVER_COMMITTED):
        _vm(item)
    item.refresh_from_db()
    allowed = state in allowed_states and (needs_t is None or tstate == needs_t)
    if allowed:
        moved, job = _run(op, item)
        fresh = ProtectedItem.objects.get(pk=item.pk)
        assert fresh.protection_state == (to_state or state)
        assert fresh.test_failover_state == (to_t or tstate)
        assert job.type == job_type and job.state == JobState.QUEUED and job.target_id == str(item.pk)
        # A second click while it runs is refused, and changes nothing.
        with pytest.raises(Conflict) as err:
            _run(op, fresh)
        assert err.value.status == 409
        assert _jobs(item) == 1
    else:
        with pytest.raises(Conflict) as err:
            _run(op, item)
        assert err.value.status == 409 and err.value.extra["current_state"] in (state, tstate)
        fresh = ProtectedItem.objects.get(pk=item.pk)
        assert (fresh.protection_state, fresh.test_failover_state) == (state, tstate)
        assert _jobs(item) == 0


# --- bad input changes nothing --------------------------------------------------------------


@pytest.mark.parametrize("op,kwargs,message", [
    ("test", {"point": "custom"}, "needs recoveryPointId"),
    ("test", {"point": "latest_app_consistent"}, "no app-consistent"),
    ("test", {"point": "latest", "network": "recovery-net"}, "needs an isolated test network"),
    ("test", {"point": "latest", "network": "nowhere"}, "not a network of the recovery site"),
    ("unplanned", {"point": "custom", "recovery_point_id": "not-a-point"}, "has no recovery point not-a-point"),
    ("unplanned", {"point": "latest", "network": "test-net"}, "needs a recovery network"),
    ("planned", {"network": "test-net"}, "needs a recovery network"),
])
def test_bad_input_is_refused_and_nothing_changes(op, kwargs, message):
    item = _item()
    fn = {"test": services.protected_item_test_failover, "unplanned": services.protected_item_unplanned_failover,
          "planned": services.protected_item_planned_failover}[op]
    with pytest.raises(ValidationFailed, match=message):
        fn(item=item, **kwargs)
    fresh = ProtectedItem.objects.get(pk=item.pk)
    assert (fresh.protection_state, fresh.test_failover_state) == (P.PROTECTED, T.NONE)
    assert _jobs(item) == 0


def test_no_recovery_site_is_a_clear_400():
    item = _item(site=False)
    with pytest.raises(ValidationFailed, match="has no recovery site"):
        services.protected_item_unplanned_failover(item=item, point="latest")
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.PROTECTED


def test_planned_failover_needs_a_vcenter_to_shut_the_source_down():
    item = _item(vcenter=False)
    with pytest.raises(ValidationFailed, match="unplanned failover"):
        services.protected_item_planned_failover(item=item)
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.PROTECTED


def test_chosen_point_and_network_go_to_the_job():
    item = _item()
    point = item.recovery_points.order_by("seq").first()
    _, job = services.protected_item_test_failover(item=item, point="latest", network=item.test_network)
    assert job.params["network_id"] == item.test_network_id
    assert job.params["point_id"] == item.recovery_points.order_by("-seq").first().point_id
    _, job = services.protected_item_unplanned_failover(
        item=item, point="custom", recovery_point_id=str(point.pk), shut_down_source=False, network="recovery-net",
    )
    assert job.params == {"point_id": point.point_id, "point_choice": "custom", "network_id": item.recovery_network_id,
                          "shut_down_source": False}


def test_apply_point_and_commit_wait_for_each_other():
    item = _item(P.FAILED_OVER)
    _vm(item)
    _, job = services.protected_item_apply_recovery_point(item=item, point="latest")
    with pytest.raises(Conflict, match="change recovery point is running") as err:
        services.protected_item_failover_commit(item=item)
    assert err.value.extra["job"] == str(job.pk)
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.FAILED_OVER
    Job.objects.filter(pk=job.pk).update(state=JobState.SUCCEEDED)
    services.protected_item_failover_commit(item=item)
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.FAILOVER_COMMITTED


def test_apply_point_needs_the_failed_over_vm():
    item = _item(P.FAILED_OVER)
    with pytest.raises(Conflict, match="no failed-over VM"):
        services.protected_item_apply_recovery_point(item=item, point="latest")
    assert _jobs(item) == 0


def test_recovered_vms_selector_lists_current_and_removed():
    item = _item(P.FAILED_OVER)
    test_vm = _vm(item, "TEST")
    RecoveredVm.objects.filter(pk=test_vm.pk).update(removed_at=timezone.now(), cleanup_notes="drill done")
    failover_vm = _vm(item)
    assert list(services.recovered_vms_for_item(item=item)) == [failover_vm, test_vm]
    assert services.current_recovered_vm(item=item, kind="FAILOVER") == failover_vm
    assert services.current_recovered_vm(item=item, kind="TEST") is None
