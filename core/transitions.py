"""One compare-and-set for every state field of Lifeboat.

Each state field is a ``StateMachine``: the model field it lives in and one table of the
allowed moves (source -> targets). ``transition`` is the only code that writes such a field:
``UPDATE ... SET field = target WHERE pk = ? AND field IN (sources allowed for target)``.
One row touched means the move happened; none means the caller lost a race or the state
never allowed the operation, and the caller gets ``InvalidTransition`` with the current
state (or ``None`` with ``quiet=True``, for failure hooks that move a row only if it is
still where the failed operation left it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from django.utils import timezone

from core.choices import JobState as J
from core.exceptions import InvalidTransition


@dataclass(frozen=True)
class StateMachine:
    name: str  # "protection state": how a refusal names the field
    field: str  # the model field that holds the state
    table: Mapping[str, frozenset[str]]
    # Fields set to "now" with every move (e.g. state_changed_at, updated_at).
    stamps: tuple[str, ...] = ()
    # How a refusal reads: (row, operation) -> sentence. Default: "Cannot <op> ... while it is <state>."
    refusal: Callable[[object, str], str] | None = field(default=None, compare=False)

    def sources_for(self, target: str) -> frozenset[str]:
        """Every state from which ``target`` may be entered."""
        return frozenset(src for src, targets in self.table.items() if target in targets)

    def is_allowed(self, source: str, target: str) -> bool:
        return target in self.table.get(source, frozenset())

    def cells(self) -> list[tuple[str, str]]:
        """Every allowed (source, target) pair."""
        return sorted((src, dst) for src, dsts in self.table.items() for dst in dsts)

    def describe(self, row, operation: str) -> str:
        if self.refusal is not None:
            return self.refusal(row, operation)
        display = getattr(row, f"get_{self.field}_display", None)
        state = display() if display else getattr(row, self.field)
        return f"Cannot {operation} '{row}' while it is {str(state).lower()}."


def transition(
    machine: StateMachine,
    *,
    model,
    pk,
    to_state: str,
    operation: str,
    from_states: Iterable[str] | None = None,
    quiet: bool = False,
    match: dict | None = None,
    **fields,
):
    """Move the row ``pk`` of ``model`` to ``to_state`` if its state allows it.

    ``from_states`` narrows the allowed sources (e.g. a failure hook that only acts on the
    state its own operation left). Other ``fields`` are written in the same statement.
    Returns the row as it is after the move; on refusal raises ``InvalidTransition``, or
    returns ``None`` when ``quiet``.
    """
    allowed = machine.sources_for(to_state)
    if from_states is not None:
        allowed &= frozenset(from_states)
    now = timezone.now()
    stamps = {name: now for name in machine.stamps}
    updated = model.objects.filter(pk=pk, **{f"{machine.field}__in": allowed}, **(match or {})).update(
        **{machine.field: to_state}, **stamps, **fields
    )
    if updated == 1:
        return model.objects.get(pk=pk)
    if quiet:
        return None
    row = model.objects.filter(pk=pk).first()
    if row is None:
        raise InvalidTransition(f"Cannot {operation}: it no longer exists.", current_state="", operation=operation)
    raise InvalidTransition(machine.describe(row, operation), current_state=getattr(row, machine.field), operation=operation)


# --- the job state machine --------------------------------------------------------------

JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    # A worker claims it; an admin cancels it; the reaper fails it when its message was lost
    # more often than it re-sends.
    J.QUEUED: frozenset({J.RUNNING, J.CANCELLED, J.FAILED}),
    # The handler ends, waits, or is asked to cancel; the reaper fails a silent one.
    J.RUNNING: frozenset({J.SUCCEEDED, J.FAILED, J.WAITING, J.CANCELLING}),
    # An event, the periodic check or an admin's Resume queues it again; cancel ends it at
    # once (no worker holds it); the reaper fails one whose handler is gone.
    J.WAITING: frozenset({J.QUEUED, J.CANCELLED, J.FAILED}),
    # The handler notices (or ends first, for better or worse); the reaper fails a silent one.
    J.CANCELLING: frozenset({J.CANCELLED, J.FAILED, J.SUCCEEDED}),
    J.SUCCEEDED: frozenset(),
    J.FAILED: frozenset(),
    J.CANCELLED: frozenset(),
}


_JOB_PASSIVE = {"cancel": "be cancelled", "fail": "be failed", "resume": "be resumed", "finish": "finish"}


def _job_refusal(job, operation: str) -> str:
    return f"This job is {job.get_state_display().lower()} and cannot {_JOB_PASSIVE.get(operation, operation)}."


JOB = StateMachine(name="job state", field="state", table=JOB_TRANSITIONS, refusal=_job_refusal)
