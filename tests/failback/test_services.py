"""Failback's refusals and failure hooks: every step the state does not allow is a 409 with
the current state, a bad body a 400, and neither changes anything; a reaped job puts things
back where an admin can act. (The round trip itself: test_failback_e2e.py.)"""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from core.choices import JobState
from core.jobs import jobs_reap
from core.models import Job
from failback.models import Failback
from recovery_plans.models import RecoveredVm
from replication.choices import Direction
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem
from tests.factories import ProtectedItemFactory
from vault import services as vault_services

ITEMS = "/api/v1/replicationProtectedItems"


def _committed(tmp_path, *, recovery_ps=True, master_target=True) -> ProtectedItem:
    from replication.services import protected_item_set_recovery

    item = ProtectedItemFactory()
    site = vault_services.recovery_site_create(vault=item.vault, name="rs", host=str(tmp_path / "rs"),
                                               networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")])
    item = protected_item_set_recovery(item=item, recovery_site=site)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=P.FAILOVER_COMMITTED)
    RecoveredVm.objects.create(item=item, kind="FAILOVER", site=site, network=item.recovery_network, vm_id="vm-1",
                               name=item.name, point_id="p", point_time=timezone.now(), point_type="crash_consistent")
    if recovery_ps:
        vault_services.process_server_create(vault=item.vault, name="ps-recovery", host="127.0.0.1", site="RECOVERY")
    if master_target:
        vault_services.master_target_server_create(vault=item.vault, name="mt-01", host="127.0.0.1")
    return ProtectedItem.objects.get(pk=item.pk)


def _unchanged(item: ProtectedItem, state: str) -> None:
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == state
    assert not Job.objects.filter(target_id=str(item.pk)).exists()


def test_reprotect_only_after_a_committed_failover(db, api, tmp_path):
    item = _committed(tmp_path)
    for state in (P.PROTECTED, P.FAILED_OVER, P.RESYNCING, P.INITIAL_REPLICATION):
        ProtectedItem.objects.filter(pk=item.pk).update(protection_state=state)
        r = api.post(f"{ITEMS}/{item.pk}/reProtect", {}, format="json")
        assert r.status_code == 409, r.content
        assert r.json()["error"]["current_state"] == state and "committed failover" in r.json()["error"]["message"]
        _unchanged(item, state)
    assert not Failback.objects.exists()


@pytest.mark.parametrize("body,words", [
    ({"location": "HOME"}, "location"),
    ({"processServer": "no-such-ps"}, "no-such-ps"),
    ({"masterTarget": "mt-99"}, "mt-99"),
    ({"vcenter": "elsewhere"}, "elsewhere"),
])
def test_bad_reprotect_bodies_change_nothing(db, api, tmp_path, body, words):
    item = _committed(tmp_path)
    r = api.post(f"{ITEMS}/{item.pk}/reProtect", body, format="json")
    assert r.status_code == 400, r.content
    assert words in r.content.decode()
    _unchanged(item, P.FAILOVER_COMMITTED)
    assert not Failback.objects.exists()


@pytest.mark.parametrize("missing,words", [("recovery_ps", "process server in the recovery site"),
                                           ("master_target", "master target server")])
def test_reprotect_says_what_infrastructure_is_missing(db, api, tmp_path, missing, words):
    item = _committed(tmp_path, **{missing: False})
    r = api.post(f"{ITEMS}/{item.pk}/reProtect", {}, format="json")
    assert r.status_code == 400 and words in r.json()["error"]["message"]
    _unchanged(item, P.FAILOVER_COMMITTED)


def test_original_location_needs_the_original_vm(db, api, tmp_path):
    item = _committed(tmp_path)  # a machine registered by its agent: no vCenter
    r = api.post(f"{ITEMS}/{item.pk}/reProtect", {}, format="json")
    assert r.status_code == 400 and "alternate location" in r.json()["error"]["message"]
    _unchanged(item, P.FAILOVER_COMMITTED)


def test_later_steps_refused_before_their_time(db, api, tmp_path):
    item = _committed(tmp_path)
    for action in ("failBack", "failbackCommit", "reEnableReplication"):
        r = api.post(f"{ITEMS}/{item.pk}/{action}", {}, format="json")
        assert r.status_code == 409, (action, r.content)
        assert "no failback under way" in r.json()["error"]["message"]
    bad = api.post(f"{ITEMS}/{item.pk}/failBack", {"type": "sideways"}, format="json")
    assert bad.status_code == 400
    _unchanged(item, P.FAILOVER_COMMITTED)


def _failback(item: ProtectedItem, state: str) -> Failback:
    from vault.models import MasterTargetServer, ProcessServer, VCenter

    vcenter = VCenter.objects.create(vault=item.vault, name="vc", kind="simulated", host="/nonexistent", username="u",
                                     password_encrypted="x")
    returning = ProtectedItemFactory(vault=item.vault, direction=Direction.RECOVERY_TO_PRIMARY,
                                     protection_state=P.PROTECTED, name=item.name)
    return Failback.objects.create(
        vault=item.vault, item=item, returning_item=returning, state=state, vcenter=vcenter,
        process_server=ProcessServer.objects.get(vault=item.vault, name="ps-recovery"),
        master_target=MasterTargetServer.objects.get(vault=item.vault), target_vm_uuid=item.machine.instance_uuid,
        recovered_vm=RecoveredVm.objects.get(item=item),
    )


def test_steps_follow_the_failback_state(db, api, tmp_path):
    item = _committed(tmp_path)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=P.REPROTECTING)
    failback = _failback(item, "REPROTECTING")
    # Still reprotecting: not yet failed back, committed or re-enabled.
    for action in ("failBack", "failbackCommit", "reEnableReplication", "reProtect"):
        r = api.post(f"{ITEMS}/{item.pk}/{action}", {}, format="json")
        assert r.status_code == 409, (action, r.content)
    # Replicating back: a returning item not yet protected cannot fail back either.
    Failback.objects.filter(pk=failback.pk).update(state="REPLICATING_BACK")
    ProtectedItem.objects.filter(pk=failback.returning_item_id).update(protection_state=P.RESYNCING)
    r = api.post(f"{ITEMS}/{item.pk}/plannedFailover", {}, format="json")
    assert r.status_code == 409 and "resynchronizing" in r.json()["error"]["message"]
    assert Failback.objects.get(pk=failback.pk).state == "REPLICATING_BACK"
    # The returning item is no item to fail over to a recovery site, to plan, or to disable.
    returning = failback.returning_item
    assert api.post(f"{ITEMS}/{returning.pk}/testFailover", {}, format="json").status_code == 400
    assert api.delete(f"{ITEMS}/{returning.pk}/").status_code == 400
    assert ProtectedItem.objects.get(pk=returning.pk).protection_state == P.RESYNCING
    shown = api.get(f"{ITEMS}/{returning.pk}/").json()
    assert shown["direction"] == "RECOVERY_TO_PRIMARY" and shown["failback"]["item"] == str(item.pk)
    listed = api.get(f"/api/v1/failbacks/?item={item.pk}").json()
    assert [f["state"] for f in listed["results"]] == ["REPLICATING_BACK"]


def _reaped(item: ProtectedItem, job_type: str, **params) -> Job:
    old = timezone.now() - timedelta(minutes=30)
    job = Job.objects.create(vault=item.vault, type=job_type, state=JobState.RUNNING, target_type="protected_item",
                             target_id=str(item.pk), target_name=item.name, params=params, started_at=old, heartbeat_at=old)
    assert jobs_reap(timeout_seconds=60) == [str(job.id)]
    return Job.objects.get(pk=job.pk)


def test_a_reaped_reprotect_leaves_the_item_committed_and_removes_the_returning_item(db, tmp_path, settings):
    settings.LIFEBOAT_STORAGE = {"kind": "local", "root": str(tmp_path / "storage")}
    from replication.engine import reset_storage

    reset_storage()
    item = _committed(tmp_path)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=P.REPROTECTING)
    failback = _failback(item, "REPROTECTING")
    returning = failback.returning_item
    job = _reaped(item, "REPROTECT", failback=str(failback.pk))
    assert "reprotect it again" in job.error
    failback.refresh_from_db()
    assert failback.state == "REPROTECT_FAILED" and failback.returning_item is None
    assert failback.last_error.startswith("Reprotect failed: The worker")
    assert not ProtectedItem.objects.filter(pk=returning.pk).exists()
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.FAILOVER_COMMITTED
    reset_storage()


def test_a_reaped_failback_goes_back_to_replicating(db, tmp_path):
    item = _committed(tmp_path)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=P.REPROTECTING)
    failback = _failback(item, "FAILBACK_IN_PROGRESS")
    ProtectedItem.objects.filter(pk=failback.returning_item_id).update(protection_state=P.FAILOVER_IN_PROGRESS)
    job = _reaped(item, "FAILBACK", failback=str(failback.pk), planned=False, shut_down=False)
    assert "goes on replicating to on-premises" in job.error
    failback.refresh_from_db()
    assert failback.state == "REPLICATING_BACK" and "Failover to on-premises failed" in failback.last_error
    assert ProtectedItem.objects.get(pk=failback.returning_item_id).protection_state == P.PROTECTED


def test_a_reaped_reenable_stays_committed(db, tmp_path):
    item = _committed(tmp_path)
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=P.REPROTECTING)
    failback = _failback(item, "REENABLING")
    job = _reaped(item, "REENABLE_REPLICATION", failback=str(failback.pk))
    assert "re-enable replication again" in job.error
    assert Failback.objects.get(pk=failback.pk).state == "COMMITTED"
