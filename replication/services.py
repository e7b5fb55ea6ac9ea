"""Services of replication: the protected-item state machine and the operations on items."""
from __future__ import annotations

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.utils import timezone

from core.choices import JobType
from core.exceptions import Conflict, InvalidTransition, ValidationFailed
from core.jobs import job_create
from replication.choices import ProtectionState, TestFailoverState
from replication.models import ProtectedItem
from replication.transitions import PROTECTION_TRANSITIONS, TEST_FAILOVER_TRANSITIONS, sources_for
from vault.choices import Severity
from vault.services import event_record

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
            f"Cannot {operation} '{item.name}' now: "
            + ("it has no test failover." if item.test_failover_state == TestFailoverState.NONE
               else f"{item.get_test_failover_state_display().lower()}."),
            current_state=item.test_failover_state,
            operation=operation,
        )
    return item


# --- operations ---------------------------------------------------------------------------


ENABLE_STEPS = ["Check prerequisites", "Install the mobility agent", "Create replica disks", "Initial replication", "Start delta replication"]


def protected_item_enable(*, vault, machine, policy, process_server, recovery_site=None, user=None):
    """Protect a machine: the item row (ENABLING) and its enable-replication job, together."""
    problems = []
    if machine.vault_id != vault.pk or policy.vault_id != vault.pk or process_server.vault_id != vault.pk:
        problems.append("The machine, policy and process server must all belong to this vault.")
    if policy.is_failback:
        problems.append("A failback policy cannot be used to enable replication; choose its replication policy.")
    if machine.missing:
        problems.append(f"{machine.name} was not found by the last discovery.")
    if recovery_site is not None and recovery_site.vault_id != vault.pk:
        problems.append("The recovery site must belong to this vault.")
    if problems:
        raise ValidationFailed(" ".join(problems))
    from vault.models import DiscoveredMachine

    with transaction.atomic():
        # The machine's row lock serializes two simultaneous requests for the same machine.
        DiscoveredMachine.objects.select_for_update().get(pk=machine.pk)
        if ProtectedItem.objects.filter(machine=machine).exists():
            raise Conflict(f"{machine.name} is already protected.", code="already_protected")
        item = ProtectedItem(vault=vault, machine=machine, policy=policy, process_server=process_server, name=machine.name)
        _recovery_mapping(item, recovery_site=recovery_site)
        item.save()
        job = job_create(
            job_type=JobType.ENABLE_REPLICATION, vault=vault, target_type="protected_item", target_id=str(item.pk),
            target_name=item.name, steps=ENABLE_STEPS, created_by=user,
        )
        event_record(vault=vault, kind="enable_replication", message=f"Enabling replication of {item.name}.", protected_item=item)
    return item, job


def protected_item_enable_retry(*, item, user=None):
    with transaction.atomic():
        item = protected_item_transition(item_id=item.pk, to_state=ProtectionState.ENABLING, operation="retry enabling replication", last_error="")
        job = job_create(
            job_type=JobType.ENABLE_REPLICATION, vault=item.vault, target_type="protected_item", target_id=str(item.pk),
            target_name=item.name, steps=ENABLE_STEPS, created_by=user,
        )
    return item, job


def protected_item_disable(*, item, user=None):
    """Stop replicating and remove the item and its replica data (as a job)."""
    with transaction.atomic():
        item = protected_item_transition(item_id=item.pk, to_state=ProtectionState.DISABLING, operation="disable replication")
        job = job_create(
            job_type=JobType.DISABLE_REPLICATION, vault=item.vault, target_type="protected_item", target_id=str(item.pk),
            target_name=item.name, steps=["Stop replication", "Remove replica data", "Remove the item"], created_by=user,
        )
    return item, job


RESYNC_STEPS = ["Start resynchronization", "Compare and send changed blocks", "Apply the resynchronization"]


def protected_item_resync(*, item, user=None):
    """Resynchronize now (ASR's repairReplication): an item that needs it, or a protected
    item whose replica an admin doubts (then every block is compared with the source)."""
    with transaction.atomic():
        item = protected_item_transition(
            item_id=item.pk, to_state=ProtectionState.RESYNCING, operation="resynchronize",
            from_states={ProtectionState.RESYNC_REQUIRED, ProtectionState.PROTECTED}, last_error="",
        )
        job = job_create(
            job_type=JobType.RESYNC, vault=item.vault, target_type="protected_item", target_id=str(item.pk),
            target_name=item.name, steps=RESYNC_STEPS, created_by=user,
        )
    return item, job


def protected_item_mark_resync_required(*, item, reason: str) -> bool:
    """Data may have been lost in transit: the item needs resynchronization. Idempotent."""
    try:
        protected_item_transition(
            item_id=item.pk, to_state=ProtectionState.RESYNC_REQUIRED, operation="mark for resynchronization",
            from_states={ProtectionState.PROTECTED, ProtectionState.INITIAL_REPLICATION, ProtectionState.RESYNCING},
            last_error=reason[:2000],
        )
    except InvalidTransition:
        return False
    event_record(vault=item.vault, kind="resync_required", message=f"{item.name} needs resynchronization: {reason}", severity=Severity.WARNING, protected_item=item)
    return True


# --- recovery settings ----------------------------------------------------------------------

# While a recovered VM of the item exists (or is being made) its site and networks stay.
RECOVERY_SETTINGS_FROZEN = frozenset({ProtectionState.FAILOVER_IN_PROGRESS, ProtectionState.FAILED_OVER,
                                      ProtectionState.FAILOVER_COMMITTED, ProtectionState.REPROTECTING})


def _recovery_mapping(item: ProtectedItem, *, recovery_site, recovery_network=None, test_network=None) -> None:
    """Set the item's recovery site and network mapping; a network not given is the site's
    first of its purpose. Validated by the item's ``clean()``."""
    from vault.models import NetworkPurpose

    item.recovery_site = recovery_site
    if recovery_site is None:
        item.recovery_network = item.test_network = None
        return
    networks = list(recovery_site.networks.order_by("name"))
    item.recovery_network = recovery_network or next((n for n in networks if n.purpose == NetworkPurpose.RECOVERY), None)
    item.test_network = test_network or next((n for n in networks if n.purpose == NetworkPurpose.TEST), None)
    item.full_clean(exclude=["vault", "machine", "policy", "process_server", "name"], validate_unique=False)


def protected_item_set_recovery(*, item: ProtectedItem, recovery_site, recovery_network=None, test_network=None) -> ProtectedItem:
    """Choose where the item is recovered: its recovery site and network mapping."""
    with transaction.atomic():
        item = ProtectedItem.objects.select_for_update().get(pk=item.pk)
        if item.protection_state in RECOVERY_SETTINGS_FROZEN or item.test_failover_state != TestFailoverState.NONE:
            state = (item.get_protection_state_display() if item.protection_state in RECOVERY_SETTINGS_FROZEN
                     else f"test failover {item.get_test_failover_state_display()}")
            raise InvalidTransition(
                f"The recovery site of '{item.name}' cannot change while a recovered VM of it exists ({state.lower()}).",
                current_state=item.protection_state, operation="change the recovery site",
            )
        try:
            _recovery_mapping(item, recovery_site=recovery_site, recovery_network=recovery_network, test_network=test_network)
        except DjangoValidationError as exc:
            raise ValidationFailed(" ".join(exc.messages), extra={"fields": exc.message_dict if hasattr(exc, "error_dict") else {}}) from None
        item.save(update_fields=["recovery_site", "recovery_network", "test_network", "updated_at"])
    return item
