"""The failback state machine: reprotect, fail back, commit, re-enable.

A failback is a row of its own (``failback.models.Failback``) beside the item it brings
home; every change of its state goes through ``core.transitions.transition`` with
``FAILBACK``, a compare-and-set, so a double click or two REST clients never start the
same step twice.
"""
from django.db import models

from core.transitions import StateMachine


class FailbackState(models.TextChoices):
    REPROTECTING = "REPROTECTING", "Reprotecting"
    REPROTECT_FAILED = "REPROTECT_FAILED", "Reprotect failed"
    REPLICATING_BACK = "REPLICATING_BACK", "Replicating to on-premises"
    FAILBACK_IN_PROGRESS = "FAILBACK_IN_PROGRESS", "Failover to on-premises in progress"
    FAILED_BACK = "FAILED_BACK", "Failed over to on-premises, commit pending"
    COMMITTED = "COMMITTED", "Failback committed"
    REENABLING = "REENABLING", "Re-enabling replication"
    COMPLETED = "COMPLETED", "Completed: replicating to the recovery site again"


F = FailbackState
# A failback that is going on: the item has at most one.
FailbackState.ACTIVE = frozenset({F.REPROTECTING, F.REPROTECT_FAILED, F.REPLICATING_BACK, F.FAILBACK_IN_PROGRESS,
                                  F.FAILED_BACK, F.COMMITTED, F.REENABLING})

FAILBACK_TRANSITIONS: dict[str, frozenset[str]] = {
    F.REPROTECTING: frozenset({F.REPLICATING_BACK, F.REPROTECT_FAILED}),
    F.REPROTECT_FAILED: frozenset({F.REPROTECTING}),
    F.REPLICATING_BACK: frozenset({F.FAILBACK_IN_PROGRESS}),
    # A failed failover to on-premises goes back to replicating (the recovered VM is powered on again).
    F.FAILBACK_IN_PROGRESS: frozenset({F.FAILED_BACK, F.REPLICATING_BACK}),
    F.FAILED_BACK: frozenset({F.COMMITTED}),
    F.COMMITTED: frozenset({F.REENABLING}),
    # A failed re-enable is retried from COMMITTED.
    F.REENABLING: frozenset({F.COMPLETED, F.COMMITTED}),
    F.COMPLETED: frozenset(),
}

FAILBACK = StateMachine(name="failback state", field="state", table=FAILBACK_TRANSITIONS, stamps=("updated_at",))
