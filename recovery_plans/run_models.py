"""A recovery plan's run: one operation (test failover, cleanup, planned or unplanned failover,
commit) over the plan's groups, in order. Its state follows ``recovery_plans.transitions.PLAN_RUN``;
the work is done by a plan job (``recovery_plans.runs``) with a child job per item."""
from __future__ import annotations

from django.conf import settings
from django.db import models

from recovery_plans.transitions import PlanRunState


class PlanOperation(models.TextChoices):
    """The operations a plan runs (ASR's names, as in the API's URLs)."""

    TEST_FAILOVER = "testFailover", "Test failover"
    TEST_FAILOVER_CLEANUP = "testFailoverCleanup", "Cleanup test failover"
    PLANNED_FAILOVER = "plannedFailover", "Planned failover"
    UNPLANNED_FAILOVER = "unplannedFailover", "Unplanned failover"
    FAILOVER_COMMIT = "failoverCommit", "Commit failover"
    # Failback, run by the failback app through runs.plan_operation_register.
    REPROTECT = "reProtect", "Reprotect"
    FAILBACK = "failBack", "Fail over to on-premises"
    FAILBACK_COMMIT = "failbackCommit", "Commit failback"
    REENABLE = "reEnableReplication", "Re-enable replication"


# A run in one of these states holds the plan: no second run starts meanwhile.
PlanRunState.ACTIVE = frozenset({PlanRunState.NOT_STARTED, PlanRunState.RUNNING, PlanRunState.WAITING_FOR_ACTION,
                                  PlanRunState.CANCELLING})


class RecoveryPlanRun(models.Model):
    plan = models.ForeignKey("recovery_plans.RecoveryPlan", on_delete=models.CASCADE, related_name="runs")
    operation = models.CharField(max_length=24, choices=PlanOperation.choices)
    state = models.CharField(max_length=24, choices=PlanRunState.choices, default=PlanRunState.NOT_STARTED,
                             db_index=True, editable=False)
    # The plan job doing the work now (a retry or "continue" starts a new one).
    job = models.ForeignKey("core.Job", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # What the admin chose (recovery point, network, comments, shut down source).
    options = models.JSONField(default=dict, blank=True)
    # The plan's groups when the run started: edits of the plan meanwhile do not change a run.
    groups = models.JSONField(default=list, blank=True, editable=False)
    # Per item id: name, group, state (SUCCEEDED / FAILED / SKIPPED), job, error.
    items = models.JSONField(default=dict, blank=True, editable=False)
    # The stage (``runs.run_stages``) the run stopped at: a retry starts there, a continue after it.
    stopped_stage = models.PositiveIntegerField(null=True, blank=True, editable=False)
    message = models.TextField(blank=True, editable=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["plan"], condition=models.Q(state__in=sorted(PlanRunState.ACTIVE)), name="uniq_active_plan_run"
            )
        ]

    def __str__(self) -> str:
        return f"{self.get_operation_display()} of {self.plan}"

    @property
    def is_active(self) -> bool:
        return self.state in PlanRunState.ACTIVE
