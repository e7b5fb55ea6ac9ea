"""A job whose worker died: a resumable handler is run again on another worker from its last
finished step (at most three times), and the silent run, if its worker comes back, writes
nothing more; any other handler is failed with a sentence, as before."""
from __future__ import annotations

import threading
from datetime import timedelta

from django.db import connection
from django.utils import timezone

from core.choices import JobState
from core.jobs import HANDLERS, MAX_SENDS, JobHandler, job_execute, jobs_reap
from core.models import Job

QUEUE = "test-rerun"  # a queue no worker of the tests consumes: the test runs the job itself
RUNS: list[str] = []
FROZEN = threading.Event()  # set: the first run's worker comes back
IN_STEP = threading.Event()


def _resumable(ctx):
    ctx.run_step("Copy", lambda: RUNS.append("copy") or 7)
    with ctx.step("Finish"):
        RUNS.append("finish")
        if len(RUNS) == 2:  # the first run's worker freezes here (then is given up on)
            IN_STEP.set()
            FROZEN.wait(30)
        ctx.summary("Done.")
    return {"copied": ctx.memo["results"]["Copy"]}


HANDLERS["T_RESUMABLE"] = JobHandler(run=_resumable, queue=QUEUE, resumable=True)


def _queued() -> Job:
    RUNS.clear()
    FROZEN.clear()
    IN_STEP.clear()
    return Job.objects.create(type="T_RESUMABLE", state=JobState.QUEUED, queue=QUEUE, celery_task_id="first",
                              queued_at=timezone.now(), steps=[{"name": n, "state": "PENDING", "progress": 0}
                                                               for n in ("Copy", "Finish")])


def test_a_resumable_job_whose_worker_went_silent_runs_again_and_the_silent_run_writes_nothing(transactional_db):
    job = _queued()

    def first_worker():
        try:
            job_execute(job_id=str(job.pk))
        finally:
            connection.close()

    frozen = threading.Thread(target=first_worker)
    frozen.start()
    assert IN_STEP.wait(30)
    assert jobs_reap(timeout_seconds=-60) == []  # its heartbeat counts as too old: not failed, sent again
    again = Job.objects.get(pk=job.pk)
    assert again.state == JobState.QUEUED and again.celery_task_id != "first"
    assert again.memo["workers_lost"] == 1
    job_execute(job_id=str(job.pk))  # another worker takes it: the finished step is not run again
    done = Job.objects.get(pk=job.pk)
    assert done.state == JobState.SUCCEEDED and done.result == {"copied": 7}
    assert RUNS == ["copy", "finish", "finish"]
    FROZEN.set()  # the first worker comes back: it finds the job is not its own any more
    frozen.join(timeout=30)
    assert not frozen.is_alive()
    after = Job.objects.get(pk=job.pk)
    assert after.state == JobState.SUCCEEDED and after.steps == done.steps and after.result == {"copied": 7}


def test_a_resumable_job_that_loses_its_worker_again_and_again_is_failed_with_a_sentence(db):
    old = timezone.now() - timedelta(minutes=10)
    job = Job.objects.create(type="T_RESUMABLE", state=JobState.RUNNING, queue=QUEUE, celery_task_id="t",
                             heartbeat_at=old, memo={"workers_lost": MAX_SENDS})
    assert jobs_reap(timeout_seconds=300) == [str(job.pk)]
    failed = Job.objects.get(pk=job.pk)
    assert failed.state == JobState.FAILED and "stopped reporting" in failed.error and failed.error.endswith(".")


def test_a_job_that_is_not_resumable_is_still_failed(db):
    HANDLERS.setdefault("T_ONCE", JobHandler(run=lambda ctx: {}, queue=QUEUE))
    job = Job.objects.create(type="T_ONCE", state=JobState.RUNNING, queue=QUEUE, celery_task_id="t",
                             heartbeat_at=timezone.now() - timedelta(minutes=10))
    assert jobs_reap(timeout_seconds=300) == [str(job.pk)]
    assert Job.objects.get(pk=job.pk).state == JobState.FAILED
