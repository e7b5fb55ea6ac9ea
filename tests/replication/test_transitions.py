"""Every cell of every state machine, allowed and refused: protection, test failover, and
the tables ready for recovery-plan runs and failback (the job machine: tests/core)."""
from __future__ import annotations

import itertools

import pytest

from core.exceptions import InvalidTransition
from replication.choices import ProtectionState
from replication.choices import TestFailoverState as TFState
from replication.models import ProtectedItem
from replication.services import protected_item_test_failover_transition, protected_item_transition
from replication.transitions import PROTECTION_TRANSITIONS, TEST_FAILOVER_TRANSITIONS, is_allowed
from tests.factories import ProtectedItemFactory

EXPECTED = {
    # The design's diagram, plus: a failed enable can be retried; a failed failover rolls back
    # to PROTECTED; a failed resync asks again; a failed reprotect stays committed.
    ("ENABLING", "INITIAL_REPLICATION"), ("ENABLING", "ENABLE_FAILED"), ("ENABLING", "DISABLING"),
    ("ENABLE_FAILED", "ENABLING"), ("ENABLE_FAILED", "DISABLING"),
    ("INITIAL_REPLICATION", "PROTECTED"), ("INITIAL_REPLICATION", "RESYNC_REQUIRED"), ("INITIAL_REPLICATION", "DISABLING"),
    ("PROTECTED", "RESYNC_REQUIRED"), ("PROTECTED", "RESYNCING"), ("PROTECTED", "FAILOVER_IN_PROGRESS"), ("PROTECTED", "DISABLING"),
    ("RESYNC_REQUIRED", "RESYNCING"), ("RESYNC_REQUIRED", "DISABLING"),
    ("RESYNCING", "PROTECTED"), ("RESYNCING", "RESYNC_REQUIRED"), ("RESYNCING", "DISABLING"),
    ("FAILOVER_IN_PROGRESS", "FAILED_OVER"), ("FAILOVER_IN_PROGRESS", "PROTECTED"),
    ("FAILED_OVER", "FAILOVER_COMMITTED"),
    ("FAILOVER_COMMITTED", "REPROTECTING"), ("FAILOVER_COMMITTED", "DISABLING"),
    # Reprotect (failback) keeps the item REPROTECTING until re-enabling compares it with its
    # replica (RESYNCING); a seeded replica (failback) is compared, not copied.
    ("REPROTECTING", "RESYNCING"), ("REPROTECTING", "FAILOVER_COMMITTED"),
    ("ENABLING", "RESYNCING"),
    # A disable that failed is run again ("Disable again").
    ("DISABLING", "DISABLING"),
}
STATES = [s.value for s in ProtectionState]


def test_table_is_the_designed_one():
    table = {(src, dst) for src, dsts in PROTECTION_TRANSITIONS.items() for dst in dsts}
    assert table == EXPECTED
    assert set(PROTECTION_TRANSITIONS) == set(STATES)


@pytest.mark.parametrize("source,target", list(itertools.product(STATES, STATES)))
def test_every_cell(db, source, target):
    item = ProtectedItemFactory()
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=source)
    if (source, target) in EXPECTED:
        moved = protected_item_transition(item_id=item.pk, to_state=target, operation="test")
        assert moved.protection_state == target
    else:
        with pytest.raises(InvalidTransition) as err:
            protected_item_transition(item_id=item.pk, to_state=target, operation="test")
        assert err.value.current_state == source
        assert ProtectedItem.objects.get(pk=item.pk).protection_state == source
    assert is_allowed(source, target) == ((source, target) in EXPECTED)


TF_EXPECTED = {
    ("NONE", "IN_PROGRESS"), ("IN_PROGRESS", "SUCCEEDED"), ("IN_PROGRESS", "NONE"),
    ("SUCCEEDED", "CLEANING_UP"), ("CLEANING_UP", "NONE"), ("CLEANING_UP", "SUCCEEDED"),
}
TF_STATES = [s.value for s in TFState]


def test_test_failover_table():
    assert {(s, d) for s, ds in TEST_FAILOVER_TRANSITIONS.items() for d in ds} == TF_EXPECTED


@pytest.mark.parametrize("source,target", list(itertools.product(TF_STATES, TF_STATES)))
def test_every_test_failover_cell(db, source, target):
    item = ProtectedItemFactory()
    ProtectedItem.objects.filter(pk=item.pk).update(test_failover_state=source)
    if (source, target) in TF_EXPECTED:
        assert protected_item_test_failover_transition(item_id=item.pk, to_state=target, operation="t").test_failover_state == target
    else:
        with pytest.raises(InvalidTransition):
            protected_item_test_failover_transition(item_id=item.pk, to_state=target, operation="t")
        assert ProtectedItem.objects.get(pk=item.pk).test_failover_state == source


def test_from_states_narrows_the_allowed_sources(db):
    item = ProtectedItemFactory()
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="PROTECTED")
    with pytest.raises(InvalidTransition):
        protected_item_transition(item_id=item.pk, to_state="RESYNCING", operation="resync", from_states={"RESYNC_REQUIRED"})


def test_a_refused_move_says_why_and_a_quiet_one_returns_none(db):
    item = ProtectedItemFactory()
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="FAILED_OVER")
    with pytest.raises(InvalidTransition) as err:
        protected_item_transition(item_id=item.pk, to_state="RESYNCING", operation="resynchronize")
    assert err.value.message == f"Cannot resynchronize '{item.name}' while it is failed over."
    assert protected_item_transition(item_id=item.pk, to_state="RESYNCING", operation="resynchronize", quiet=True) is None


# --- tables ready for the plan runner and failback -------------------------------------------

from failback.transitions import FAILBACK, FailbackState  # noqa: E402
from recovery_plans.transitions import PLAN_RUN, PlanRunState  # noqa: E402

PLAN_RUN_EXPECTED = {
    ("NOT_STARTED", "RUNNING"), ("NOT_STARTED", "CANCELLED"),
    ("RUNNING", "WAITING_FOR_ACTION"), ("RUNNING", "SUCCEEDED"), ("RUNNING", "FAILED"), ("RUNNING", "CANCELLING"),
    ("WAITING_FOR_ACTION", "RUNNING"), ("WAITING_FOR_ACTION", "CANCELLING"), ("WAITING_FOR_ACTION", "FAILED"),
    ("CANCELLING", "CANCELLED"), ("CANCELLING", "FAILED"),
    ("FAILED", "RUNNING"),
}
FAILBACK_EXPECTED = {
    ("REPROTECTING", "REPLICATING_BACK"), ("REPROTECTING", "REPROTECT_FAILED"),
    ("REPROTECT_FAILED", "REPROTECTING"),
    ("REPLICATING_BACK", "FAILBACK_IN_PROGRESS"),
    ("FAILBACK_IN_PROGRESS", "FAILED_BACK"), ("FAILBACK_IN_PROGRESS", "REPLICATING_BACK"),
    ("FAILED_BACK", "COMMITTED"),
    ("COMMITTED", "REENABLING"),
    ("REENABLING", "COMPLETED"), ("REENABLING", "COMMITTED"),
}


@pytest.mark.parametrize("machine,states,expected", [
    (PLAN_RUN, [s.value for s in PlanRunState], PLAN_RUN_EXPECTED),
    (FAILBACK, [s.value for s in FailbackState], FAILBACK_EXPECTED),
], ids=["plan-run", "failback"])
def test_ready_tables_are_the_designed_ones(machine, states, expected):
    assert set(machine.cells()) == expected
    assert set(machine.table) == set(states)
    for source, target in itertools.product(states, states):
        assert machine.is_allowed(source, target) == ((source, target) in expected), (source, target)


def test_a_failed_disable_offers_disable_again(db, api):
    from core.choices import JobState
    from core.models import Job
    from replication.selectors import item_actions

    item = ProtectedItemFactory()
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="DISABLING")
    Job.objects.create(type="DISABLE_REPLICATION", target_type="protected_item", target_id=str(item.pk), state=JobState.FAILED,
                       error="The storage refused the delete.")
    item.refresh_from_db()
    assert ("disable", "Disable again") in [(a, label) for a, label, _ in item_actions(item=item)]
    response = api.delete(f"/api/v1/replicationProtectedItems/{item.pk}/")
    assert response.status_code == 202, response.content
    # While that disable runs, another is refused and nothing changes.
    again = api.delete(f"/api/v1/replicationProtectedItems/{item.pk}/")
    assert again.status_code == 409
    assert again.json()["error"]["message"] == f"'{item.name}' is being disabled already."
    assert Job.objects.filter(type="DISABLE_REPLICATION", state=JobState.QUEUED).count() == 1
    item.refresh_from_db()
    assert "disable" not in [a for a, _, _ in item_actions(item=item)]
