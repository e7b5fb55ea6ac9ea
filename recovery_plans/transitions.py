"""The recovery-plan run state machine, ready for the plan runner (built on the job engine:
a run is a parent job, its items' operations child jobs, a manual action a wait for Resume).
Every change goes through ``core.transitions.transition`` with ``PLAN_RUN``."""
from django.db import models

from core.transitions import StateMachine


class PlanRunState(models.TextChoices):
    NOT_STARTED = "NOT_STARTED", "Not started"
    RUNNING = "RUNNING", "Running"
    WAITING_FOR_ACTION = "WAITING_FOR_ACTION", "Waiting for a manual action"
    CANCELLING = "CANCELLING", "Cancelling"
    SUCCEEDED = "SUCCEEDED", "Succeeded"
    FAILED = "FAILED", "Failed"
    CANCELLED = "CANCELLED", "Cancelled"


R = PlanRunState

PLAN_RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    R.NOT_STARTED: frozenset({R.RUNNING, R.CANCELLED}),
    R.RUNNING: frozenset({R.WAITING_FOR_ACTION, R.SUCCEEDED, R.FAILED, R.CANCELLING}),
    # An admin resumes it (the action is done), cancels it, or the run fails.
    R.WAITING_FOR_ACTION: frozenset({R.RUNNING, R.CANCELLING, R.FAILED}),
    R.CANCELLING: frozenset({R.CANCELLED, R.FAILED}),
    # A failed run is restarted from the group that failed (ASR's "restart job").
    R.FAILED: frozenset({R.RUNNING}),
    R.SUCCEEDED: frozenset(),
    R.CANCELLED: frozenset(),
}

PLAN_RUN = StateMachine(name="plan run state", field="state", table=PLAN_RUN_TRANSITIONS, stamps=("updated_at",))
