"""The job engine: every long operation is a Job row first, then a Celery task.

A service creates the job with ``job_create`` inside its transaction; the task is sent only
when that transaction commits, with the job's id only. The task (``core.run_job``) claims
the row with a compare-and-set (QUEUED -> RUNNING), so a redelivered message never runs a
job twice, then calls the handler registered for the job's type with a ``JobContext``:
named steps, throttled progress, cooperative cancel.

Waiting is a state, not a sleeping worker. A handler that must wait (for an agent, a slot,
apply to catch up, an admin) calls ``ctx.wait(...)``: the job turns WAITING with what it
waits for, the event key that ends the wait and when to look again, and the worker is free.
``job_wake(key)`` (called where the event happens), the periodic ``jobs_wake_due`` (beat)
or ``job_resume`` (an admin) queue it again; the handler runs from the top and skips the
steps it finished (``ctx.run_step``). Every change of a job's state goes through
``core.transitions.transition``; a job always ends in a terminal state, with a sentence
when it failed. The reaper fails jobs whose worker stopped reporting and re-sends (a few
times, then fails) jobs whose queue message was lost.
"""
from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from core import queues
from core.choices import JobState
from core.exceptions import InvalidTransition, LifeboatError
from core.models import Job
from core.transitions import JOB, transition
from mobility.logs import log_context

logger = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 1.0  # seconds between progress writes to the database
SHORT_PAUSE_MAX = 1.0  # seconds a handler may sleep in its worker at a time (short_pause)
MAX_SENDS = 3  # a job's message is sent at most this many times before the reaper fails it
RUN_TASK = "core.run_job"


class JobCancelled(Exception):
    """Raised inside a handler when an admin asked to cancel the job."""


class JobLost(Exception):
    """Raised inside a handler whose job was ended elsewhere (the reaper failed it)."""


class JobWaiting(Exception):
    """Raised by ``JobContext.wait``: unwinds the handler so its worker is given back."""

    def __init__(self, message: str, key: str, check_after: float) -> None:
        super().__init__(message)
        self.message, self.key, self.check_after = message, key, check_after


@dataclass(frozen=True)
class JobHandler:
    run: Callable[["JobContext"], dict | None]
    queue: str
    # Called when the job ends FAILED or CANCELLED (or is reaped), to put its target back
    # into a state an admin can act on.
    on_failure: Callable[[Job, str], None] | None = None
    # The handler is written to run again from the top at any point (every step either
    # finished and kept in the memo, or safe to run again): a job whose worker died is run
    # again on another worker instead of failed (``jobs_reap``).
    resumable: bool = False


HANDLERS: dict[str, JobHandler] = {}
# Called with every job that ended FAILED or CANCELLED (vault records an alert or event;
# registered in its AppConfig.ready, so that core imports no app).
FAILURE_LISTENERS: list[Callable[[Job], None]] = []


def job_handler(job_type: str, *, queue: str = queues.CONTROL, on_failure=None, resumable: bool = False):
    def register(fn):
        HANDLERS[job_type] = JobHandler(run=fn, queue=queue, on_failure=on_failure, resumable=resumable)
        return fn

    return register


def job_failure_listener(fn: Callable[[Job], None]) -> Callable[[Job], None]:
    if fn not in FAILURE_LISTENERS:
        FAILURE_LISTENERS.append(fn)
    return fn


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
    parent: Job | None = None,
) -> Job:
    """Create a queued job and send its task when the current transaction commits."""
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
        parent=parent,
        queued_at=timezone.now(),
    )
    transaction.on_commit(lambda: _send(job.pk, job.queue, job.celery_task_id))
    return job


def _send(job_id, queue: str, task_id: str) -> None:
    """Send the job's message. A broker that is down loses it: the reaper re-sends it."""
    try:
        current_app.send_task(RUN_TASK, args=[str(job_id)], queue=queue, task_id=task_id)
    except Exception:  # noqa: BLE001 - the reaper re-sends a job nobody claimed
        logger.exception("Could not send job %s to the broker; the reaper will send it again", job_id)


class JobContext:
    """What a handler uses to report and wait: steps, progress, cancel checks, waits."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._last_write = 0.0

    @property
    def params(self) -> dict:
        return self.job.params

    @property
    def memo(self) -> dict:
        """Kept between the runs of a job (saved with its steps)."""
        return self.job.memo

    def _entry(self, name: str) -> dict:
        entry = next((s for s in self.job.steps if s["name"] == name), None)
        if entry is None:
            entry = {"name": name, "state": "PENDING", "progress": 0}
            self.job.steps.append(entry)
        return entry

    def done(self, name: str) -> bool:
        """True if the step finished in an earlier run of this job."""
        return self._entry(name).get("state") == "SUCCEEDED"

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Run a step's body as the named step. A step that may wait is run with ``run_step``,
        which skips it once done; ``step`` refuses a step that is already done."""
        self.check_cancel()
        entry = self._entry(name)
        if entry.get("state") == "SUCCEEDED":
            raise LifeboatError(f"The step '{name}' of this job already finished; it is not run twice.")
        entry["state"] = "RUNNING"
        entry.setdefault("started_at", timezone.now().isoformat())
        self._save(force=True)
        try:
            yield
        except JobWaiting as wait:
            entry.update(state="WAITING", message=wait.message, waiting=True)
            raise
        except BaseException as exc:
            entry.update(state="FAILED", ended_at=timezone.now().isoformat(), message=_describe(exc))
            entry.pop("waiting", None)
            self._save(force=True)
            raise
        # A finished step says what it did: its summary, else its last progress message,
        # never a message written while it waited.
        summary = entry.pop("summary", None)
        if entry.pop("waiting", False) and summary is None:
            entry.pop("message", None)
        if summary is not None:
            entry["message"] = summary
        entry.update(state="SUCCEEDED", progress=100, ended_at=timezone.now().isoformat())
        self._recompute_progress()
        self._save(force=True)

    def run_step(self, name: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn`` as the named step unless an earlier run finished it; either way return
        its result (kept in the job's memo, so it must be JSON: dict keys become strings)."""
        if self.done(name):
            return self.memo.get("results", {}).get(name)
        with self.step(name):
            result = fn(*args, **kwargs)
            self.memo.setdefault("results", {})[name] = result
        return result

    def summary(self, message: str) -> None:
        """What the current step did: its message once it succeeds."""
        current = self._current()
        if current is not None:
            current["summary"] = message

    def _current(self) -> dict | None:
        return next((s for s in self.job.steps if s.get("state") in ("RUNNING", "WAITING")), None)

    def progress(self, percent: float, *, message: str | None = None) -> None:
        """Progress of the current step (0-100); written at most once a second."""
        running = self._current()
        if running is not None:
            running["progress"] = max(0, min(100, int(percent)))
            if message is not None:
                running["message"] = message
                running.pop("waiting", None)
        self._recompute_progress()
        self._save()
        self.check_cancel()

    def heartbeat(self) -> None:
        self._save()

    def short_pause(self, seconds: float) -> None:
        """Sleep in the worker between two looks at something that settles within seconds
        (a journal going still, an in-flight write landing). Longer waits use ``wait``."""
        if seconds > SHORT_PAUSE_MAX:
            raise ValueError(f"a pause in the worker is at most {SHORT_PAUSE_MAX} s; use ctx.wait for longer waits")
        self.heartbeat()
        self.check_cancel()
        time.sleep(seconds)

    def wait(self, message: str, *, key: str = "", check_after: float = 5.0, progress: float | None = None) -> None:
        """Give the worker back until ``job_wake(key)`` is called or ``check_after`` seconds
        pass (then the handler runs again from the top, skipping finished steps).

        ``message`` says what the job waits for; it is the current step's message meanwhile.
        Never returns.
        """
        self.check_cancel()
        current = self._current()
        if current is not None and progress is not None:
            current["progress"] = max(0, min(100, int(progress)))
        raise JobWaiting(message, key, check_after)

    def deadline_passed(self, name: str, seconds: float) -> bool:
        """A deadline that survives waits: set ``seconds`` from the first call with ``name``."""
        deadlines = self.memo.setdefault("deadlines", {})
        if name not in deadlines:
            deadlines[name] = (timezone.now() + timedelta(seconds=seconds)).isoformat()
        return timezone.now() > datetime.fromisoformat(deadlines[name])

    def wait_for_action(self, name: str, message: str) -> dict:
        """Wait until an admin resumes the job (``job_resume``); returns who and when."""
        actions = self.memo.setdefault("actions", {})
        if name in actions:
            return actions[name]
        resumed = self.memo.pop("resumed", None)
        if resumed is not None:
            actions[name] = resumed
            return resumed
        self.wait(message, key=f"resume:{self.job.pk}", check_after=3600)
        raise AssertionError("unreachable")  # pragma: no cover

    def wait_for_children(self, message: str) -> list[Job]:
        """Wait until every child job (``job_create(parent=...)``) has ended; returns them."""
        children = list(Job.objects.filter(parent=self.job.pk).order_by("created_at"))
        if any(c.state not in JobState.TERMINAL for c in children):
            self.wait(message, key=f"children:{self.job.pk}", check_after=30)
        return children

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
        # Only this run's writes count: a run the reaper gave up on (its worker silent) and
        # sent to another worker has a new task id, so a frozen worker that comes back stops.
        alive = Job.objects.filter(pk=self.job.pk, state__in=[JobState.RUNNING, JobState.CANCELLING],
                                   celery_task_id=self.job.celery_task_id).update(
            steps=self.job.steps, progress=self.job.progress, memo=self.job.memo, heartbeat_at=timezone.now()
        )
        if not alive:
            raise JobLost()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, JobCancelled):
        return "Cancelled by an administrator."
    if isinstance(exc, JobLost):
        return "The job was ended elsewhere."
    text = str(exc).strip()
    return text or exc.__class__.__name__


def job_execute(*, job_id: str) -> None:
    """Run (or resume) a job's handler; called by the Celery task. Safe to call twice."""
    now = timezone.now()
    job = transition(JOB, model=Job, pk=job_id, to_state=JobState.RUNNING, operation="start", quiet=True,
                     heartbeat_at=now, waiting_for="", wait_key="", wake_at=None)
    if job is None:
        logger.info("Job %s is not queued any more; nothing to do", job_id)
        return
    first_run = job.started_at is None
    if first_run:
        Job.objects.filter(pk=job.pk).update(started_at=now)
        job.started_at = now
    # Every record logged while the job runs, by any module, names the job (and the item it
    # acts on): a JSON log line can be traced back to its job (mobility/logs.py).
    item_id = job.target_id if job.target_type == "protected_item" else None
    with log_context(job_id=job.id, job_type=job.type, item_id=item_id):
        _execute(job, first_run=first_run)


def _execute(job: Job, *, first_run: bool) -> None:
    handler = HANDLERS.get(job.type)
    if handler is None:
        _finish(job, JobState.FAILED, error=f"No handler is registered for jobs of type {job.type} in this worker.", handler=None)
        return
    # A waiting job runs again at every look: only its first start is worth a line at INFO.
    logger.log(logging.INFO if first_run else logging.DEBUG, "Job %s (%s) %s: %s", job.id, job.type,
               "starts" if first_run else "runs again", job.target_name or job.target_id or "no target")
    ctx = JobContext(job)
    try:
        result = handler.run(ctx) or {}
    except JobWaiting as wait:
        _wait(job, wait, handler)
        logger.debug("Job %s (%s) waits: %s", job.id, job.type, wait.message)
    except JobLost:
        logger.warning("Job %s was ended elsewhere while it ran; its handler stopped", job.id)
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


def _wait(job: Job, wait: JobWaiting, handler: JobHandler) -> None:
    waited = transition(
        JOB, model=Job, pk=job.pk, to_state=JobState.WAITING, operation="wait", quiet=True,
        from_states={JobState.RUNNING}, match={"celery_task_id": job.celery_task_id}, steps=job.steps, progress=job.progress, memo=job.memo,
        waiting_for=wait.message[:2000], wait_key=wait.key, wake_at=timezone.now() + timedelta(seconds=wait.check_after),
        heartbeat_at=timezone.now(),
    )
    if waited is None and Job.objects.filter(pk=job.pk, state=JobState.CANCELLING).exists():
        _finish(job, JobState.CANCELLED, error="Cancelled by an administrator.", handler=handler)
    elif waited is not None and wait.key == f"children:{job.pk}" and not Job.objects.filter(
            parent=job.pk, state__in=JobState.ACTIVE).exists():
        _requeue(job.pk, sends=1)  # its last child ended before it was WAITING: that wake found no one


def _finish(job: Job, state: str, *, error: str = "", result: dict | None = None, handler: JobHandler | None) -> None:
    """End the job: a compare-and-set from RUNNING/CANCELLING, so a job the reaper (or a
    cancel) already ended is never written again."""
    now = timezone.now()
    if state == JobState.SUCCEEDED:
        job.progress = 100
    for entry in job.steps:  # a step left running or waiting by a failure fails with it
        if entry.get("state") in ("RUNNING", "WAITING") and state != JobState.SUCCEEDED:
            entry.update(state="FAILED", ended_at=now.isoformat(), message=error or entry.get("message", ""))
            entry.pop("waiting", None)
    ended = transition(
        JOB, model=Job, pk=job.pk, to_state=state, operation="end", quiet=True,
        from_states={JobState.RUNNING, JobState.CANCELLING}, match={"celery_task_id": job.celery_task_id},
        error=error, result=result or {}, ended_at=now, heartbeat_at=now, steps=job.steps, progress=job.progress,
        memo=job.memo, waiting_for="", wait_key="", wake_at=None,
    )
    if ended is None:
        logger.warning("Job %s was already ended elsewhere; its result (%s) is not written", job.id, state)
        return
    took = f" after {(now - job.started_at).total_seconds():.1f} s" if job.started_at else ""
    logger.log(logging.INFO if state == JobState.SUCCEEDED else logging.WARNING, "Job %s (%s) %s%s%s",
               job.id, job.type, state.lower(), took, f": {error}" if error else "",
               extra={"job_id": str(job.id), "job_type": job.type, "job_state": state})
    _ended(ended, handler)


def _ended(job: Job, handler: JobHandler | None) -> None:
    """After a job reached a terminal state: failure hook, failure listeners, its parent."""
    if job.state != JobState.SUCCEEDED:
        if handler is not None and handler.on_failure is not None:
            try:
                handler.on_failure(job, job.error)
            except Exception:
                logger.exception("Failure hook of job %s failed", job.id)
        for listener in FAILURE_LISTENERS:
            try:
                listener(job)
            except Exception:
                logger.exception("Could not record the failure of job %s", job.id)
    if job.parent_id:
        job_wake(f"children:{job.parent_id}")


# --- waking, resuming, cancelling ---------------------------------------------------------


def _requeue(job_id, *, sends: int | None = None) -> bool:
    """WAITING -> QUEUED with a fresh message (sent when the transaction commits)."""
    task_id = str(uuid.uuid4())
    fields = {"celery_task_id": task_id, "queued_at": timezone.now(), "wake_at": None}
    if sends is not None:
        fields["sends"] = sends
    job = transition(JOB, model=Job, pk=job_id, to_state=JobState.QUEUED, operation="resume", quiet=True,
                     from_states={JobState.WAITING}, **fields)
    if job is None:
        return False
    transaction.on_commit(lambda: _send(job.pk, job.queue, task_id))
    return True


def job_wake(key: str) -> int:
    """An event happened: queue again every job waiting on ``key``. Returns how many."""
    if not key:
        return 0
    ids = list(Job.objects.filter(state=JobState.WAITING, wait_key=key).values_list("pk", flat=True))
    return sum(_requeue(pk, sends=1) for pk in ids)


def jobs_wake_due() -> int:
    """The periodic check (beat, every few seconds): queue every waiting job due a look."""
    ids = list(Job.objects.filter(state=JobState.WAITING, wake_at__lte=timezone.now()).values_list("pk", flat=True))
    return sum(_requeue(pk, sends=1) for pk in ids)


def job_resume(*, job_id, user=None) -> Job:
    """An admin's Resume: a waiting job runs again now; a step waiting for a manual action
    (``ctx.wait_for_action``) takes it as done."""
    who = getattr(user, "username", "") if getattr(user, "is_authenticated", False) else ""
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        if job.state != JobState.WAITING:
            raise InvalidTransition(
                f"This job is {job.get_state_display().lower()}, not waiting; there is nothing to resume.",
                current_state=job.state, operation="resume",
            )
        memo = {**job.memo, "resumed": {"by": who, "at": timezone.now().isoformat()}}
        Job.objects.filter(pk=job.pk).update(memo=memo)
        _requeue(job.pk, sends=1)
    job.refresh_from_db()
    return job


def job_cancel(*, job_id, user=None) -> Job:
    """Cancel a queued or waiting job at once; ask a running one to stop at its next step."""
    Job.objects.filter(pk=job_id, state__in=JobState.ACTIVE).update(cancel_requested=True)
    error = "Cancelled by an administrator."
    for attempt in range(3):  # the job may move between RUNNING and WAITING meanwhile
        ended = transition(JOB, model=Job, pk=job_id, to_state=JobState.CANCELLED, operation="cancel", quiet=True,
                           from_states={JobState.QUEUED, JobState.WAITING}, ended_at=timezone.now(), error=error,
                           waiting_for="", wait_key="", wake_at=None)
        if ended is not None:
            _ended(ended, HANDLERS.get(ended.type))
            return ended
        cancelling = transition(JOB, model=Job, pk=job_id, to_state=JobState.CANCELLING, operation="cancel",
                                from_states={JobState.RUNNING}, quiet=attempt < 2)
        if cancelling is not None:
            return cancelling
    raise AssertionError("unreachable")  # pragma: no cover


# --- the reaper ---------------------------------------------------------------------------


def _run_elsewhere(job: Job, *, cutoff: datetime, timeout: int) -> bool:
    """A running job of a resumable handler whose worker went silent: run it again on another
    worker (RUNNING -> WAITING -> QUEUED with a new task id, so the silent run, if its worker
    comes back, writes nothing more). At most ``MAX_SENDS`` times; False once that is spent."""
    lost = int(job.memo.get("workers_lost", 0)) + 1
    if lost > MAX_SENDS:
        return False
    message = (f"Its worker stopped reporting (nothing for over {timeout} seconds; it was probably restarted "
               "or killed): the job runs again on another worker from its last finished step.")
    moved = transition(JOB, model=Job, pk=job.pk, to_state=JobState.WAITING, operation="run again", quiet=True,
                       from_states={JobState.RUNNING}, match={"heartbeat_at__lt": cutoff},
                       memo={**job.memo, "workers_lost": lost}, waiting_for=message, wait_key="",
                       wake_at=timezone.now())
    if moved is None:
        return True  # it reported meanwhile, or ended: nothing to do
    logger.warning("Job %s (%s): its worker stopped reporting; running it again elsewhere (%d of %d)",
                   job.pk, job.type, lost, MAX_SENDS)
    _requeue(job.pk, sends=1)
    return True


def jobs_reap(*, timeout_seconds: int | None = None, queue_timeout_seconds: int | None = None) -> list[str]:
    """Fail every running job whose worker has not reported for ``timeout_seconds`` (a
    resumable one is run again on another worker, up to ``MAX_SENDS`` times); send again (at
    most ``MAX_SENDS`` times in all, then fail) every queued job no worker claimed within
    ``queue_timeout_seconds`` (its message was lost: broker down or restarted). Returns the
    jobs it failed."""
    timeout = timeout_seconds if timeout_seconds is not None else settings.LIFEBOAT_JOB_HEARTBEAT_TIMEOUT
    queue_timeout = queue_timeout_seconds if queue_timeout_seconds is not None else settings.LIFEBOAT_JOB_QUEUE_TIMEOUT
    now = timezone.now()
    cutoff = now - timedelta(seconds=timeout)
    reaped = []
    stale = Job.objects.filter(state__in=[JobState.RUNNING, JobState.CANCELLING], heartbeat_at__lt=cutoff)
    for job in stale:
        handler = HANDLERS.get(job.type)
        if job.state == JobState.RUNNING and handler is not None and handler.resumable and _run_elsewhere(
                job, cutoff=cutoff, timeout=timeout):
            continue
        error = (
            f"The worker running this job stopped reporting (nothing for over {timeout} seconds; "
            "it was probably restarted or killed). The job was marked failed; start the operation again."
        )
        ended = transition(JOB, model=Job, pk=job.pk, to_state=JobState.FAILED, operation="fail", quiet=True,
                           from_states={job.state}, match={"heartbeat_at__lt": cutoff}, error=error, ended_at=timezone.now())
        if ended is not None:
            _ended(ended, HANDLERS.get(ended.type))
            reaped.append(str(job.pk))
    lost = Job.objects.filter(state=JobState.QUEUED, queued_at__lt=now - timedelta(seconds=queue_timeout))
    for job in lost:
        if job.sends < MAX_SENDS:
            task_id = str(uuid.uuid4())
            if Job.objects.filter(pk=job.pk, state=JobState.QUEUED, celery_task_id=job.celery_task_id).update(
                celery_task_id=task_id, queued_at=timezone.now(), sends=job.sends + 1
            ):
                logger.warning("Job %s was not claimed within %s s; sending it again", job.pk, queue_timeout)
                transaction.on_commit(lambda job=job, task_id=task_id: _send(job.pk, job.queue, task_id))
            continue
        error = (
            f"No worker took this job: its message was sent {job.sends} times and never picked up within "
            f"{queue_timeout} seconds (the broker was probably down or restarted, or no worker serves the "
            f"'{job.queue}' queue). Nothing was done; start the operation again."
        )
        ended = transition(JOB, model=Job, pk=job.pk, to_state=JobState.FAILED, operation="fail", quiet=True,
                           from_states={JobState.QUEUED}, error=error, ended_at=timezone.now())
        if ended is not None:
            _ended(ended, HANDLERS.get(ended.type))
            reaped.append(str(job.pk))
    return reaped
