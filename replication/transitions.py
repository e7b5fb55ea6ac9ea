"""The protected-item state machines: every allowed transition, in one table each.

Every change of ``protection_state`` or ``test_failover_state`` goes through
``core.transitions.transition`` (``services.protected_item_transition`` and
``protected_item_test_failover_transition``), a compare-and-set on the row, so a double
click, two REST clients or a retried task can never start the same operation twice.
"""
from core.transitions import StateMachine
from replication.choices import ProtectionState as P
from replication.choices import TestFailoverState as T

PROTECTION_TRANSITIONS: dict[str, frozenset[str]] = {
    # A replica seeded from an existing copy (failback) is compared with its source, not copied.
    P.ENABLING: frozenset({P.INITIAL_REPLICATION, P.RESYNCING, P.ENABLE_FAILED, P.DISABLING}),
    P.ENABLE_FAILED: frozenset({P.ENABLING, P.DISABLING}),
    P.INITIAL_REPLICATION: frozenset({P.PROTECTED, P.RESYNC_REQUIRED, P.DISABLING}),
    P.PROTECTED: frozenset({P.RESYNC_REQUIRED, P.RESYNCING, P.FAILOVER_IN_PROGRESS, P.DISABLING}),
    P.RESYNC_REQUIRED: frozenset({P.RESYNCING, P.DISABLING}),
    P.RESYNCING: frozenset({P.PROTECTED, P.RESYNC_REQUIRED, P.DISABLING}),
    P.FAILOVER_IN_PROGRESS: frozenset({P.FAILED_OVER, P.PROTECTED}),
    P.FAILED_OVER: frozenset({P.FAILOVER_COMMITTED}),
    P.FAILOVER_COMMITTED: frozenset({P.REPROTECTING, P.DISABLING}),
    # Failback: the item stays REPROTECTING while its VM replicates back and fails over to
    # on-premises; re-enabling compares the on-premises VM with the replica (RESYNCING); a
    # reprotect that failed leaves it committed.
    P.REPROTECTING: frozenset({P.RESYNCING, P.FAILOVER_COMMITTED}),
    # A disable that failed (its job failed or was reaped) is run again from here.
    P.DISABLING: frozenset({P.DISABLING}),
}

TEST_FAILOVER_TRANSITIONS: dict[str, frozenset[str]] = {
    T.NONE: frozenset({T.IN_PROGRESS}),
    T.IN_PROGRESS: frozenset({T.SUCCEEDED, T.NONE}),
    T.SUCCEEDED: frozenset({T.CLEANING_UP}),
    T.CLEANING_UP: frozenset({T.NONE, T.SUCCEEDED}),
}


def _protection_refusal(item, operation: str) -> str:
    return f"Cannot {operation} '{item.name}' while it is {item.get_protection_state_display().lower()}."


def _test_failover_refusal(item, operation: str) -> str:
    now = ("it has no test failover." if item.test_failover_state == T.NONE
           else f"{item.get_test_failover_state_display().lower()}.")
    return f"Cannot {operation} '{item.name}' now: {now}"


PROTECTION = StateMachine(name="protection state", field="protection_state", table=PROTECTION_TRANSITIONS,
                          stamps=("state_changed_at", "updated_at"), refusal=_protection_refusal)
TEST_FAILOVER = StateMachine(name="test failover state", field="test_failover_state", table=TEST_FAILOVER_TRANSITIONS,
                             stamps=("updated_at",), refusal=_test_failover_refusal)


def sources_for(target: str, table: dict[str, frozenset[str]] = PROTECTION_TRANSITIONS) -> frozenset[str]:
    """Every state from which ``target`` may be entered."""
    return frozenset(src for src, targets in table.items() if target in targets)


def is_allowed(source: str, target: str, table: dict[str, frozenset[str]] = PROTECTION_TRANSITIONS) -> bool:
    return target in table.get(source, frozenset())
