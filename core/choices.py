from django.db import models


class JobState(models.TextChoices):
    QUEUED = "QUEUED", "Queued"
    RUNNING = "RUNNING", "In progress"
    WAITING = "WAITING", "Waiting"
    CANCELLING = "CANCELLING", "Cancelling"
    SUCCEEDED = "SUCCEEDED", "Succeeded"
    FAILED = "FAILED", "Failed"
    CANCELLED = "CANCELLED", "Cancelled"


JobState.ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.WAITING, JobState.CANCELLING})
JobState.TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
JobState.CANCELLABLE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.WAITING})


class JobType(models.TextChoices):
    # Only operations that exist are listed; each new operation adds its type here.
    DISCOVERY = "DISCOVERY", "Discover vCenter"
    ENABLE_REPLICATION = "ENABLE_REPLICATION", "Enable replication"
    DISABLE_REPLICATION = "DISABLE_REPLICATION", "Disable replication"
    RESYNC = "RESYNC", "Resynchronize"
    TEST_FAILOVER = "TEST_FAILOVER", "Test failover"
    TEST_FAILOVER_CLEANUP = "TEST_FAILOVER_CLEANUP", "Cleanup test failover"
    PLANNED_FAILOVER = "PLANNED_FAILOVER", "Planned failover"
    UNPLANNED_FAILOVER = "UNPLANNED_FAILOVER", "Unplanned failover"
    APPLY_RECOVERY_POINT = "APPLY_RECOVERY_POINT", "Change recovery point"
    FAILOVER_COMMIT = "FAILOVER_COMMIT", "Commit failover"
    PLAN_TEST_FAILOVER = "PLAN_TEST_FAILOVER", "Test failover of a recovery plan"
    PLAN_TEST_FAILOVER_CLEANUP = "PLAN_TEST_FAILOVER_CLEANUP", "Cleanup test failover of a recovery plan"
    PLAN_PLANNED_FAILOVER = "PLAN_PLANNED_FAILOVER", "Planned failover of a recovery plan"
    PLAN_UNPLANNED_FAILOVER = "PLAN_UNPLANNED_FAILOVER", "Unplanned failover of a recovery plan"
    PLAN_FAILOVER_COMMIT = "PLAN_FAILOVER_COMMIT", "Commit failover of a recovery plan"
    REPROTECT = "REPROTECT", "Reprotect (replicate back to on-premises)"
    FAILBACK = "FAILBACK", "Fail over to on-premises"
    FAILBACK_COMMIT = "FAILBACK_COMMIT", "Commit failback"
    REENABLE_REPLICATION = "REENABLE_REPLICATION", "Re-enable replication"
    PLAN_REPROTECT = "PLAN_REPROTECT", "Reprotect a recovery plan"
    PLAN_FAILBACK = "PLAN_FAILBACK", "Fail a recovery plan over to on-premises"
    PLAN_FAILBACK_COMMIT = "PLAN_FAILBACK_COMMIT", "Commit failback of a recovery plan"
    PLAN_REENABLE = "PLAN_REENABLE", "Re-enable replication of a recovery plan"
    CHANGE_PROCESS_SERVER = "CHANGE_PROCESS_SERVER", "Switch process server"
