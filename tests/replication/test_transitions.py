"""Every cell of the protected-item state machine, allowed and refused."""
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
    ("REPROTECTING", "PROTECTED"), ("REPROTECTING", "FAILOVER_COMMITTED"),
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
