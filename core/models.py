from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from core.choices import JobState, JobType


class TimeStampedModel(models.Model):
    created_at = models.DateTimeField(auto_now_add=True, editable=False)
    updated_at = models.DateTimeField(auto_now=True, editable=False)

    class Meta:
        abstract = True


class Job(models.Model):
    """A long-running operation: a row first, then a Celery task that works through its steps."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vault = models.ForeignKey("vault.Vault", on_delete=models.CASCADE, related_name="jobs", null=True, blank=True)
    type = models.CharField(max_length=40, choices=JobType.choices, db_index=True)
    state = models.CharField(
        max_length=20, choices=JobState.choices, default=JobState.QUEUED, db_index=True, editable=False
    )
    # What the job acts on, named for display and filtering (an item, a vCenter, a plan...).
    target_type = models.CharField(max_length=40, blank=True, db_index=True)
    target_id = models.CharField(max_length=64, blank=True, db_index=True)
    target_name = models.CharField(max_length=255, blank=True)
    params = models.JSONField(default=dict, blank=True)
    steps = models.JSONField(default=list, blank=True, editable=False)
    progress = models.PositiveSmallIntegerField(default=0, editable=False)
    error = models.TextField(blank=True, editable=False)
    result = models.JSONField(default=dict, blank=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    celery_task_id = models.CharField(max_length=64, blank=True, editable=False)
    queue = models.CharField(max_length=32, blank=True, editable=False)
    cancel_requested = models.BooleanField(default=False, editable=False)
    # A job run on behalf of another (a plan's per-item jobs): the parent waits for them.
    parent = models.ForeignKey("self", on_delete=models.CASCADE, null=True, blank=True, related_name="children")
    # What the handler keeps between runs (steps done, their results, deadlines, resumes).
    memo = models.JSONField(default=dict, blank=True, editable=False)
    # While WAITING: what for (a sentence), the event key that wakes it, when to look again.
    waiting_for = models.TextField(blank=True, editable=False)
    wait_key = models.CharField(max_length=120, blank=True, db_index=True, editable=False)
    wake_at = models.DateTimeField(null=True, blank=True, db_index=True, editable=False)
    # When its message was last sent to the broker, and how many times it was (re-)sent.
    queued_at = models.DateTimeField(null=True, blank=True, editable=False)
    sends = models.PositiveSmallIntegerField(default=1, editable=False)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True, editable=False)
    ended_at = models.DateTimeField(null=True, blank=True, editable=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["target_type", "target_id", "state"])]

    def __str__(self) -> str:
        return f"{self.get_type_display()} {self.target_name or self.target_id}".strip()

    @property
    def is_terminal(self) -> bool:
        return self.state in JobState.TERMINAL

    @property
    def duration_seconds(self) -> float | None:
        if not self.started_at:
            return None
        end = self.ended_at or timezone.now()
        return (end - self.started_at).total_seconds()


class ApiToken(models.Model):
    """A personal API token: a user names it, may give it an expiry, and revokes it. Only the
    SHA-256 of the secret is kept (``core.tokens``); the secret is shown once, at creation."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    # The secret's first characters, shown in lists so that a user can tell tokens apart.
    prefix = models.CharField(max_length=16, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= timezone.now():
            return "expired"
        return "active"
