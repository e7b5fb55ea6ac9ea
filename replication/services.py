"""Services of replication: the protected-item state machine and the operations on items."""
from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from core.exceptions import InvalidTransition
from replication.choices import ProtectionState, TestFailoverState
from replication.models import ProtectedItem
from replication.transitions import PROTECTION_TRANSITIONS, TEST_FAILOVER_TRANSITIONS, sources_for

logger = logging.getLogger(__name__)


def protected_item_transition(
    *,
    item_id,
    to_state: str,
    operation: str,
    from_states: frozenset[str] | set[str] | None = None,
    **fields,
) -> ProtectedItem:
    """Move an item to ``to_state`` if, and only if, it is in an allowed source state.

    A compare-and-set on the row: ``UPDATE ... WHERE id = ? AND protection_state IN (...)``
    must touch exactly one row, otherwise the caller lost a race (or the state never allowed
    the operation) and gets ``InvalidTransition`` with the current state. Other ``fields``
    are written in the same statement.
    """
    allowed = sources_for(to_state, PROTECTION_TRANSITIONS)
    if from_states is not None:
        allowed = allowed & frozenset(from_states)
    updated = ProtectedItem.objects.filter(pk=item_id, protection_state__in=allowed).update(
        protection_state=to_state, state_changed_at=timezone.now(), updated_at=timezone.now(), **fields
    )
    item = ProtectedItem.objects.get(pk=item_id)
    if updated != 1:
        raise InvalidTransition(
            f"Cannot {operation} '{item.name}' while it is {item.get_protection_state_display().lower()}.",
            current_state=item.protection_state,
            operation=operation,
        )
    return item


def protected_item_test_failover_transition(*, item_id, to_state: str, operation: str) -> ProtectedItem:
    allowed = sources_for(to_state, TEST_FAILOVER_TRANSITIONS)
    updated = ProtectedItem.objects.filter(pk=item_id, test_failover_state__in=allowed).update(
        test_failover_state=to_state, updated_at=timezone.now()
    )
    item = ProtectedItem.objects.get(pk=item_id)
    if updated != 1:
        raise InvalidTransition(
            f"Cannot {operation} '{item.name}' while its test failover is {item.get_test_failover_state_display().lower()}.",
            current_state=item.test_failover_state,
            operation=operation,
        )
    return item
