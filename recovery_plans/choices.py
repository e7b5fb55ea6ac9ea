from django.db import models


class PlanState(models.TextChoices):
    """What a recovery plan's items are doing, as a whole (derived from the items, never stored)."""

    EMPTY = "EMPTY", "Empty: no protected items"
    NOT_READY = "NOT_READY", "Not ready to fail over"
    READY = "READY", "Ready to fail over"
    TEST_FAILOVER_IN_PROGRESS = "TEST_FAILOVER_IN_PROGRESS", "Test failover in progress"
    TEST_FAILOVER_CLEANUP_PENDING = "TEST_FAILOVER_CLEANUP_PENDING", "Test failover done, cleanup pending"
    FAILOVER_IN_PROGRESS = "FAILOVER_IN_PROGRESS", "Failover in progress"
    PARTIALLY_FAILED_OVER = "PARTIALLY_FAILED_OVER", "Partly failed over"
    FAILED_OVER = "FAILED_OVER", "Failed over, commit pending"
    FAILOVER_COMMITTED = "FAILOVER_COMMITTED", "Failover committed"


# Something is running on the plan's items: the plan's page polls.
PlanState.IN_PROGRESS = frozenset({PlanState.TEST_FAILOVER_IN_PROGRESS, PlanState.FAILOVER_IN_PROGRESS})
