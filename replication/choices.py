from django.db import models


class ProtectionState(models.TextChoices):
    ENABLING = "ENABLING", "Enabling protection"
    ENABLE_FAILED = "ENABLE_FAILED", "Enabling protection failed"
    INITIAL_REPLICATION = "INITIAL_REPLICATION", "Initial replication in progress"
    PROTECTED = "PROTECTED", "Protected"
    RESYNC_REQUIRED = "RESYNC_REQUIRED", "Resynchronization required"
    RESYNCING = "RESYNCING", "Resynchronizing"
    FAILOVER_IN_PROGRESS = "FAILOVER_IN_PROGRESS", "Failover in progress"
    FAILED_OVER = "FAILED_OVER", "Failed over"
    FAILOVER_COMMITTED = "FAILOVER_COMMITTED", "Failover committed"
    REPROTECTING = "REPROTECTING", "Reprotecting"
    DISABLING = "DISABLING", "Disabling protection"


P = ProtectionState
# Data flows from the source to the replica in these states.
ProtectionState.REPLICATING = frozenset({P.INITIAL_REPLICATION, P.PROTECTED, P.RESYNC_REQUIRED, P.RESYNCING})
# Test failover (a drill) may start: replication is going on and the item has points.
ProtectionState.TEST_FAILOVER_ALLOWED = frozenset({P.PROTECTED, P.RESYNC_REQUIRED, P.RESYNCING})
# An operation is under way: the item's page polls, no other operation may start.
ProtectionState.IN_PROGRESS = frozenset(
    {P.ENABLING, P.INITIAL_REPLICATION, P.RESYNCING, P.FAILOVER_IN_PROGRESS, P.REPROTECTING, P.DISABLING}
)


class TestFailoverState(models.TextChoices):
    NONE = "NONE", "None"
    IN_PROGRESS = "IN_PROGRESS", "Test failover in progress"
    SUCCEEDED = "SUCCEEDED", "Test failover succeeded (cleanup pending)"
    CLEANING_UP = "CLEANING_UP", "Cleaning up test failover"


class Direction(models.TextChoices):
    PRIMARY_TO_RECOVERY = "PRIMARY_TO_RECOVERY", "Primary to recovery"
    RECOVERY_TO_PRIMARY = "RECOVERY_TO_PRIMARY", "Recovery to primary"


class RecoveryPointType(models.TextChoices):
    CRASH_CONSISTENT = "crash_consistent", "Crash-consistent"
    APP_CONSISTENT = "app_consistent", "App-consistent"
    # The replica then held blocks of a disk scanned without a frozen view (read at different
    # moments): never chosen as "latest" for a failover.
    NOT_CRASH_CONSISTENT = "not_crash_consistent", "Not crash-consistent"


class GroupPointState(models.TextChoices):
    """A replication group's shared point: the barrier's round, then its members' points."""

    HOLDING = "holding", "Holding the members' writes"
    RELEASED = "released", "Released: members' points follow"  # bookmarks placed at the held positions
    ABANDONED = "abandoned", "Abandoned: a member was not held in time"


class RegistrationState(models.TextChoices):
    """An agent registration that needs an administrator (issue 16 part 3): a machine that
    already has an agent, registered without that agent's token."""

    PENDING = "PENDING", "Waiting for approval"
    APPROVED = "APPROVED", "Approved"
    REJECTED = "REJECTED", "Rejected"


RegistrationState.DECIDED = frozenset({RegistrationState.APPROVED, RegistrationState.REJECTED})
