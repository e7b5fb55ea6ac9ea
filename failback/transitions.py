"""The failback state machine (reprotect, fail back, re-enable), ready for the failback
jobs. Every change goes through ``core.transitions.transition`` with ``FAILBACK``."""
from django.db import models

from core.transitions import StateMachine


class FailbackState(models.TextChoices):
    NONE = "NONE", "No failback"
    REPROTECTING = "REPROTECTING", "Reprotecting"
    REPROTECT_FAILED = "REPROTECT_FAILED", "Reprotect failed"
    REPLICATING_BACK = "REPLICATING_BACK", "Replicating to the primary site"
    FAILBACK_IN_PROGRESS = "FAILBACK_IN_PROGRESS", "Failback in progress"
    FAILED_BACK = "FAILED_BACK", "Failed back, commit pending"
    COMMITTED = "COMMITTED", "Failback committed"
    REENABLING = "REENABLING", "Re-enabling replication"


F = FailbackState

FAILBACK_TRANSITIONS: dict[str, frozenset[str]] = {
    F.NONE: frozenset({F.REPROTECTING}),
    F.REPROTECTING: frozenset({F.REPLICATING_BACK, F.REPROTECT_FAILED}),
    F.REPROTECT_FAILED: frozenset({F.REPROTECTING, F.NONE}),
    # A failed failback goes back to replicating back (the recovered VM keeps running).
    F.REPLICATING_BACK: frozenset({F.FAILBACK_IN_PROGRESS, F.NONE}),
    F.FAILBACK_IN_PROGRESS: frozenset({F.FAILED_BACK, F.REPLICATING_BACK}),
    F.FAILED_BACK: frozenset({F.COMMITTED}),
    F.COMMITTED: frozenset({F.REENABLING}),
    # Re-enabling ends in a newly protected item; a failed re-enable is retried.
    F.REENABLING: frozenset({F.NONE, F.COMMITTED}),
}

FAILBACK = StateMachine(name="failback state", field="failback_state", table=FAILBACK_TRANSITIONS, stamps=("updated_at",))
