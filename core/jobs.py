"""The job engine: every long operation is a Job row first, then a Celery task.

A service creates the job with ``job_create`` inside its transaction; the task is enqueued
only when that transaction commits, with the job's id only. The task (``core.run_job``)
claims the row with a compare-and-set (QUEUED -> RUNNING), so a redelivered message never
runs a job twice, then calls the handler registered for the job's type with a
``JobContext``: named steps, throttled progress, cooperative cancel. The job always ends in
a terminal state, with a sentence saying why when it failed. A periodic reaper fails jobs
whose worker stopped reporting.
"""
from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from core import queues
from core.choices import JobState
from core.exceptions import InvalidTransition, LifeboatError
from core.models import Job

logger = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 1.0  # seconds between progress writes to the database


class JobCancelled(Exception):
    """Raised inside a handler when an admin asked to cancel the job."""


@dataclass(frozen=True)
class JobHandler:
    run: Callable[["JobContext"], dict | None]
    queue: str
    # Called when the job ends FAILED or CANCELLED (or is reaped), to put its target back
    # into a state an admin can act on.
    on_failure: Callable[[Job, str], None] | None = None


HANDLERS: dict[str, JobHandler] = {}


def job_handler(job_type: str, *, queue: str = queues.CONTROL, on_failure=None):
    def register(fn):
        HANDLERS[job_type] = JobHandler(run=fn, queue=queue, on_failure=on_failure)
        return fn

    return register


def job_create(
    *,
    job_type: str,
    vault=None,
    target_type: str = "",
    target_id: str = "",
    target_name: str = "",
    params: dict | None = None,
    steps: list[str] | None = None,
    created_by=None,
) -> Job:
    """Create a queued job and enqueue its task when the current transaction commits."""
    handler = HANDLERS.get(job_type)
    if handler is None:
        raise LifeboatError(f"No handler is registered for jobs of type {job_type}.")
    job = Job.objects.create(
        id=uuid.uuid4(),
        vault=vault,
        type=job_type,
        target_type=target_type,
        target_id=str(target_id),
        target_name=target_name,
        params=params or {},
        steps=[{"name": s, "state": "PENDING", "progress": 0} for s in (steps or [])],
        created_by=created_by if getattr(created_by, "is_authenticated", False) else None,
        celery_task_id=str(uuid.uuid4()),
        queue=handler.queue,
    )
    transaction.on_commit(lambda: _enqueue(job))
    return job


def _enqueue(job: Job) -> None:
    from core.tasks import run_job

    run_job.apply_async(args=[str(job.id)], queue=job.queue, task_id=job.celery_task_id)


class JobContext:
    """What a handler uses to report: steps, progress, cancel checks."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._last_write = 0.0

    @property
    def params(self) -> dict:
        return self.job.params

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.check_cancel()
        steps = self.job.steps
        entry = next((s for s in steps if s["name"] == name), None)
        if entry is None:
            entry = {"name": name, "state": "PENDING", "progress": 0}
            steps.append(entry)
        entry.update(state="RUNNING", started_at=timezone.now().isoformat())
        self._save(force=True)
        try:
            yield
        except BaseException as exc:
            entry.update(state="FAILED", ended_at=timezone.now().isoformat(), message=_describe(exc))
            self._save(force=True)
            raise
        entry.update(state="SUCCEEDED", progress=100, ended_at=timezone.now().isoformat())
        self._recompute_progress()
        self._save(force=True)

    def progress(self, percent: float, *, message: str | None = None) -> None:
        """Progress of the current step (0-100); written at most once a second."""
        running = next((s for s in self.job.steps if s.get("state") == "RUNNING"), None)
        if running is not None:
            running["progress"] = max(0, min(100, int(percent)))
            if message is not None:
                running["message"] = message
        self._recompute_progress()
        self._save()
        self.check_cancel()

    def heartbeat(self) -> None:
        self._save()

    def pause(self, seconds: float) -> None:
        """Wait in the worker between two looks at what the step waits for, keeping the
        job's heartbeat (so the reaper leaves it alone)."""
        self.heartbeat()
        time.sleep(seconds)

    def check_cancel(self) -> None:
        if Job.objects.filter(pk=self.job.pk, cancel_requested=True).exists():
            raise JobCancelled()

    def _recompute_progress(self) -> None:
        steps = self.job.steps
        if steps:
            self.job.progress = int(sum(s.get("progress", 0) for s in steps) / len(steps))

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_WRITE_INTERVAL:
            return
        self._last_write = now
        Job.objects.filter(pk=self.job.pk).update(
            steps=self.job.steps, progress=self.job.progress, heartbeat_at=timezone.now()
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, JobCancelled):
        return "Cancelled by an administrator."
    text = str(exc).strip()
    return text or exc.__class__.__name__


def job_execute(*, job_id: str) -> None:
    """Run a job's handler; called by the Celery task. Safe to call twice for one job."""
    now = timezone.now()
    claimed = Job.objects.filter(pk=job_id, state=JobState.QUEUED).update(
        state=JobState.RUNNING, started_at=now, heartbeat_at=now
    )
    if not claimed:
        logger.info("Job %s is not queued any more; nothing to do", job_id)
        return
    job = Job.objects.get(pk=job_id)
    handler = HANDLERS[job.type]
    ctx = JobContext(job)
    try:
        result = handler.run(ctx) or {}
    except JobCancelled:
        _finish(job, JobState.CANCELLED, error="Cancelled by an administrator.", handler=handler)
    except LifeboatError as exc:
        _finish(job, JobState.FAILED, error=exc.message, handler=handler)
    except Exception as exc:  # a handler bug or an unexpected peer failure: fail with a sentence
        logger.exception("Job %s (%s) failed", job.id, job.type)
        message = _describe(exc)
        if not isinstance(exc, (OSError, ValueError)) and not hasattr(exc, "clear_message"):
            message = f"Unexpected error ({exc.__class__.__name__}): {message}"
        _finish(job, JobState.FAILED, error=message, handler=handler)
    else:
        _finish(job, JobState.SUCCEEDED, result=result, handler=handler)


def _finish(job: Job, state: str, *, error: str = "", result: dict | None = None, handler: JobHandler) -> None:
    now = timezone.now()
    if state == JobState.SUCCEEDED:
        job.progress = 100
    Job.objects.filter(pk=job.pk).update(
        state=state,
        error=error,
        result=result or {},
        ended_at=now,
        heartbeat_at=now,
        steps=job.steps,
        progress=job.progress,
    )
    job.state, job.error = state, error
    if state != JobState.SUCCEEDED:
        if handler.on_failure is not None:
            try:
                handler.on_failure(job, error)
            except Exception:
                logger.exception("Failure hook of job %s failed", job.id)
        _report_failure(job)


def _report_failure(job: Job) -> None:
    from vault.services import job_failure_recorded

    try:
        job_failure_recorded(job=job)
    except Exception:
        logger.exception("Could not record the failure of job %s", job.id)


def job_cancel(*, job_id, user=None) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next step."""
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        if job.state == JobState.QUEUED:
            job.state, job.ended_at, job.error = JobState.CANCELLED, timezone.now(), "Cancelled by an administrator."
            job.cancel_requested = True
            job.save(update_fields=["state", "ended_at", "error", "cancel_requested"])
            handler = HANDLERS.get(job.type)
            cancelled_queued = True
        elif job.state == JobState.RUNNING:
            job.state, job.cancel_requested = JobState.CANCELLING, True
            job.save(update_fields=["state", "cancel_requested"])
            cancelled_queued = False
        else:
            raise InvalidTransition(
                f"This job is {job.get_state_display().lower()} and cannot be cancelled.",
                current_state=job.state,
                operation="cancel",
            )
    if cancelled_queued and handler and handler.on_failure:
        try:
            handler.on_failure(job, job.error)
        except Exception:
            logger.exception("Failure hook of cancelled job %s failed", job.id)
    return job


def jobs_reap(*, timeout_seconds: int | None = None) -> list[str]:
    """Fail every running job whose worker has not reported for ``timeout_seconds``."""
    timeout = timeout_seconds if timeout_seconds is not None else settings.LIFEBOAT_JOB_HEARTBEAT_TIMEOUT
    cutoff = timezone.now() - timedelta(seconds=timeout)
    reaped = []
    stale = Job.objects.filter(state__in=[JobState.RUNNING, JobState.CANCELLING], heartbeat_at__lt=cutoff)
    for job in stale:
        error = (
            f"The worker running this job stopped reporting (nothing for over {timeout} seconds; "
            "it was probably restarted or killed). The job was marked failed; start the operation again."
        )
        updated = Job.objects.filter(pk=job.pk, state=job.state, heartbeat_at__lt=cutoff).update(
            state=JobState.FAILED, error=error, ended_at=timezone.now()
        )
        if updated:
            job.state, job.error = JobState.FAILED, error
            handler = HANDLERS.get(job.type)
            if handler and handler.on_failure:
                try:
                    handler.on_failure(job, error)
                except Exception:
                    logger.exception("Failure hook of reaped job %s failed", job.id)
            _report_failure(job)
            reaped.append(str(job.id))
    return reaped
