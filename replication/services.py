"""Services of replication: the protected-item state machine and the operations on items."""
from __future__ import annotations

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction

from core.choices import JobState, JobType
from core.exceptions import Conflict, InvalidTransition, ValidationFailed
from core.jobs import job_create
from core.models import Job
from core.transitions import transition
from replication.choices import Direction, ProtectionState, TestFailoverState
from replication.models import ProtectedItem
from replication.selectors import process_server_least_loaded
from replication.transitions import PROTECTION, TEST_FAILOVER
from vault.choices import Severity
from vault.models import DiscoveredMachine, NetworkPurpose
from vault.services import event_record

logger = logging.getLogger(__name__)


def protected_item_transition(
    *,
    item_id,
    to_state: str,
    operation: str,
    from_states: frozenset[str] | set[str] | None = None,
    quiet: bool = False,
    **fields,
) -> ProtectedItem | None:
    """Move an item to ``to_state`` if, and only if, it is in an allowed source state.

    A compare-and-set on the row (``core.transitions.transition``): the loser of a race, or
    a state that never allowed the operation, gets ``InvalidTransition`` with the current
    state (``None`` with ``quiet``). Other ``fields`` are written in the same statement.
    """
    return transition(PROTECTION, model=ProtectedItem, pk=item_id, to_state=to_state, operation=operation,
                      from_states=from_states, quiet=quiet, **fields)


def protected_item_test_failover_transition(
    *, item_id, to_state: str, operation: str, from_states=None, quiet: bool = False, **fields
) -> ProtectedItem | None:
    return transition(TEST_FAILOVER, model=ProtectedItem, pk=item_id, to_state=to_state, operation=operation,
                      from_states=from_states, quiet=quiet, **fields)


# --- operations ---------------------------------------------------------------------------


ENABLE_STEPS = ["Check prerequisites", "Install the mobility agent", "Create replica disks", "Initial replication", "Start delta replication"]


def protected_item_enable(*, vault, machine, policy, process_server=None, recovery_site=None, user=None):
    """Protect a machine: the item row (ENABLING) and its enable-replication job, together.
    Without a ``process_server`` the vault's least loaded one takes the item
    (``selectors.process_server_least_loaded``)."""
    if process_server is None:
        process_server = process_server_least_loaded(vault=vault)
        if process_server is None:
            raise ValidationFailed(f"The vault {vault.name} has no process server to send {machine.name}'s "
                                   "replication to: add one (Infrastructure) first.")
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


def protected_item_delete(*, item_id) -> None:
    """Delete an item's row and the rows that go with it. The row is locked first: a report
    that adds a row naming the item meanwhile (a process server's data-path sample, an
    agent's event) waits for the delete and then fails on the item being gone, instead of
    its row, committed after the delete had gathered the item's rows, failing the delete."""
    with transaction.atomic():
        if ProtectedItem.objects.select_for_update().filter(pk=item_id).exists():
            ProtectedItem.objects.filter(pk=item_id).delete()


def protected_item_enable_retry(*, item, user=None):
    with transaction.atomic():
        item = protected_item_transition(item_id=item.pk, to_state=ProtectionState.ENABLING, operation="retry enabling replication", last_error="")
        job = job_create(
            job_type=JobType.ENABLE_REPLICATION, vault=item.vault, target_type="protected_item", target_id=str(item.pk),
            target_name=item.name, steps=ENABLE_STEPS, created_by=user,
        )
    return item, job


def protected_item_disable(*, item, user=None):
    """Stop replicating and remove the item and its replica data (as a job). An item left
    DISABLING by a disable that failed is disabled again the same way."""
    if item.direction == Direction.RECOVERY_TO_PRIMARY and item.protection_state != ProtectionState.DISABLING:
        raise ValidationFailed(
            f"'{item.name}' is the replication of a failback back to on-premises: it ends when replication of the "
            "item that failed over is re-enabled.")
    with transaction.atomic():
        ProtectedItem.objects.select_for_update().filter(pk=item.pk).first()  # one disable at a time
        if Job.objects.filter(type=JobType.DISABLE_REPLICATION, target_type="protected_item", target_id=str(item.pk),
                              state__in=JobState.ACTIVE).exists():
            raise Conflict(f"'{item.name}' is being disabled already.", code="invalid_state",
                           extra={"current_state": ProtectionState.DISABLING, "operation": "disable replication"})
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


CHANGE_PROCESS_SERVER_STEPS = ["Check the new process server", "Pause shipping", "Drain the old process server",
                               "Switch", "Resume shipping"]


def protected_item_change_process_server(*, item, process_server, user=None):
    """Switch process server (ASR's "Switch process server"): the item's agent sends to
    ``process_server`` from now on, going on from where the stream stands: nothing is copied
    again. A job (replication.jobs.run_change_process_server): the old server uploads what it
    acknowledged before the agent is told of the new one."""
    with transaction.atomic():
        # The item's row lock serializes two switches of one item.
        item = ProtectedItem.objects.select_for_update().select_related("process_server", "vault").get(pk=item.pk)
        old = item.process_server
        if process_server.vault_id != item.vault_id:
            raise ValidationFailed(f"The process server {process_server.name} belongs to another vault.")
        if process_server.pk == old.pk:
            raise ValidationFailed(f"{item.name} already replicates through {old.name}.")
        if process_server.site != old.site:
            raise ValidationFailed(f"{process_server.name} is a process server of the "
                                   f"{process_server.get_site_display().lower()} site; {item.name} needs one of the "
                                   f"{old.get_site_display().lower()} site, as {old.name} is.")
        if not process_server.thumbprint:
            raise ValidationFailed(f"{process_server.name} has never reported to the vault: start it (its configuration "
                                   f"is GET /api/v1/processServers/{process_server.pk}/configuration) before moving "
                                   "items to it.")
        if item.protection_state != ProtectionState.PROTECTED:
            raise InvalidTransition(
                f"Only a protected item switches process server; {item.name} is "
                f"{item.get_protection_state_display().lower()}. Switch it once that is over.",
                current_state=item.protection_state, operation="switch the process server of",
            )
        if Job.objects.filter(type=JobType.CHANGE_PROCESS_SERVER, target_type="protected_item",
                              target_id=str(item.pk), state__in=JobState.ACTIVE).exists():
            raise Conflict(f"{item.name} is switching process server already.", code="invalid_state",
                           extra={"current_state": item.protection_state, "operation": "switch the process server of"})
        job = job_create(
            job_type=JobType.CHANGE_PROCESS_SERVER, vault=item.vault, target_type="protected_item",
            target_id=str(item.pk), target_name=item.name, params={"process_server": process_server.pk, "from": old.pk},
            steps=CHANGE_PROCESS_SERVER_STEPS, created_by=user,
        )
        event_record(vault=item.vault, kind="process_server_switch", protected_item=item,
                     message=f"Switching {item.name} from process server {old.name} to {process_server.name}.")
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
