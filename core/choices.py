from django.db import models


class JobState(models.TextChoices):
    QUEUED = "QUEUED", "Queued"
    RUNNING = "RUNNING", "In progress"
    CANCELLING = "CANCELLING", "Cancelling"
    SUCCEEDED = "SUCCEEDED", "Succeeded"
    FAILED = "FAILED", "Failed"
    CANCELLED = "CANCELLED", "Cancelled"


JobState.ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})
JobState.TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
JobState.CANCELLABLE = frozenset({JobState.QUEUED, JobState.RUNNING})


class JobType(models.TextChoices):
    # Only operations that exist are listed; each new operation adds its type here.
    DISCOVERY = "DISCOVERY", "Discover vCenter"
    ENABLE_REPLICATION = "ENABLE_REPLICATION", "Enable replication"
    DISABLE_REPLICATION = "DISABLE_REPLICATION", "Disable replication"
    RESYNC = "RESYNC", "Resynchronize"
