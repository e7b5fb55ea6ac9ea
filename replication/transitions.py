"""The protected-item state machine: every allowed transition, in one table.

Every change of ``protection_state`` goes through ``services.protected_item_transition``,
which applies it as a compare-and-set on the row, so a double click, two REST clients or a
retried task can never start the same operation twice.
"""
from replication.choices import ProtectionState as P
from replication.choices import TestFailoverState as T

PROTECTION_TRANSITIONS: dict[str, frozenset[str]] = {
    P.ENABLING: frozenset({P.INITIAL_REPLICATION, P.ENABLE_FAILED, P.DISABLING}),
    P.ENABLE_FAILED: frozenset({P.ENABLING, P.DISABLING}),
    P.INITIAL_REPLICATION: frozenset({P.PROTECTED, P.RESYNC_REQUIRED, P.DISABLING}),
    P.PROTECTED: frozenset({P.RESYNC_REQUIRED, P.RESYNCING, P.FAILOVER_IN_PROGRESS, P.DISABLING}),
    P.RESYNC_REQUIRED: frozenset({P.RESYNCING, P.DISABLING}),
    P.RESYNCING: frozenset({P.PROTECTED, P.RESYNC_REQUIRED, P.DISABLING}),
    P.FAILOVER_IN_PROGRESS: frozenset({P.FAILED_OVER, P.PROTECTED}),
    P.FAILED_OVER: frozenset({P.FAILOVER_COMMITTED}),
    P.FAILOVER_COMMITTED: frozenset({P.REPROTECTING, P.DISABLING}),
    P.REPROTECTING: frozenset({P.PROTECTED, P.FAILOVER_COMMITTED}),
    P.DISABLING: frozenset(),
}

TEST_FAILOVER_TRANSITIONS: dict[str, frozenset[str]] = {
    T.NONE: frozenset({T.IN_PROGRESS}),
    T.IN_PROGRESS: frozenset({T.SUCCEEDED, T.NONE}),
    T.SUCCEEDED: frozenset({T.CLEANING_UP}),
    T.CLEANING_UP: frozenset({T.NONE, T.SUCCEEDED}),
}


def sources_for(target: str, table: dict[str, frozenset[str]] = PROTECTION_TRANSITIONS) -> frozenset[str]:
    """Every state from which ``target`` may be entered."""
    return frozenset(src for src, targets in table.items() if target in targets)


def is_allowed(source: str, target: str, table: dict[str, frozenset[str]] = PROTECTION_TRANSITIONS) -> bool:
    return target in table.get(source, frozenset())
