"""The job engine on a real Celery worker and the real broker."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.utils import timezone

from core.choices import JobState
from core.exceptions import LifeboatError
from core.jobs import HANDLERS, JobHandler, job_cancel, job_create, job_execute, jobs_reap
from core.models import Job
from tests.conftest import wait_for
from vault.models import Alert

CALLS: list[str] = []
RELEASE = threading.Event()


def _ok(ctx):
    CALLS.append(str(ctx.job.id))
    with ctx.step("First"):
        ctx.progress(50)
    with ctx.step("Second"):
        pass
    return {"answer": 42}


def _fails(ctx):
    with ctx.step("Only"):
        raise LifeboatError("The vCenter refused the request: disk is full.")


def _crashes(ctx):
    with ctx.step("Only"):
        {}["missing"]


def _waits(ctx):
    with ctx.step("Wait"):
        while True:
            ctx.check_cancel()
            ctx.heartbeat()
            if RELEASE.wait(0.05):
                return {}


@pytest.fixture(autouse=True)
def handlers():
    HANDLERS.update({
        "T_OK": JobHandler(run=_ok, queue="control"),
        "T_FAIL": JobHandler(run=_fails, queue="control"),
        "T_CRASH": JobHandler(run=_crashes, queue="control"),
        "T_WAIT": JobHandler(run=_waits, queue="control"),
    })
    CALLS.clear()
    RELEASE.clear()
    yield
    RELEASE.set()
    for key in ("T_OK", "T_FAIL", "T_CRASH", "T_WAIT"):
        HANDLERS.pop(key)


def _start(job_type, vault=None):
    from django.db import transaction

    with transaction.atomic():
        return job_create(job_type=job_type, vault=vault, target_type="test", target_id="1", target_name="thing", steps=["First", "Second"] if job_type == "T_OK" else None)


def _wait_terminal(job):
    return wait_for(lambda: Job.objects.filter(pk=job.pk, state__in=JobState.TERMINAL).first(), message=f"job {job.pk} to end")


def test_job_runs_on_worker_with_steps_and_result(celery_worker):
    job = _start("T_OK")
    done = _wait_terminal(job)
    assert done.state == JobState.SUCCEEDED
    assert done.progress == 100
    assert [s["name"] for s in done.steps] == ["First", "Second"]
    assert all(s["state"] == "SUCCEEDED" for s in done.steps)
    assert done.result == {"answer": 42}
    assert done.started_at and done.ended_at and done.started_at <= done.ended_at
    assert CALLS == [str(job.pk)]


def test_failed_job_keeps_the_reason_and_raises_an_alert(celery_worker, vault):
    job = _start("T_FAIL", vault=vault)
    done = _wait_terminal(job)
    assert done.state == JobState.FAILED
    assert done.error == "The vCenter refused the request: disk is full."
    assert done.steps[0]["state"] == "FAILED"
    alert = Alert.objects.get(job=done)
    assert "disk is full" in alert.message


def test_unexpected_error_fails_with_a_sentence_not_a_traceback(celery_worker):
    done = _wait_terminal(_start("T_CRASH"))
    assert done.state == JobState.FAILED
    assert done.error.startswith("Unexpected error (KeyError)")
    assert "Traceback" not in done.error


def test_cancel_running_job_is_cooperative(celery_worker):
    job = _start("T_WAIT")
    wait_for(lambda: Job.objects.filter(pk=job.pk, state=JobState.RUNNING).exists(), message="job to start")
    job_cancel(job_id=job.pk)
    assert Job.objects.get(pk=job.pk).state == JobState.CANCELLING
    done = _wait_terminal(job)
    assert done.state == JobState.CANCELLED


def test_cancel_queued_job_never_runs_it(transactional_db):
    job = _start("T_OK")  # no worker: it stays queued
    job_cancel(job_id=job.pk)
    job_execute(job_id=str(job.pk))  # a late delivery of the message
    assert Job.objects.get(pk=job.pk).state == JobState.CANCELLED
    assert CALLS == []


def test_cancel_finished_job_is_refused(db):
    job = Job.objects.create(type="T_OK", state=JobState.SUCCEEDED)
    with pytest.raises(LifeboatError) as err:
        job_cancel(job_id=job.pk)
    assert "cannot be cancelled" in str(err.value)


def test_a_job_runs_once_even_if_delivered_twice(transactional_db):
    job = _start("T_OK")
    job_execute(job_id=str(job.pk))
    job_execute(job_id=str(job.pk))
    assert CALLS == [str(job.pk)]


def test_reaper_fails_jobs_whose_worker_died(db, vault):
    stale = Job.objects.create(type="T_OK", vault=vault, state=JobState.RUNNING, heartbeat_at=timezone.now() - timedelta(minutes=10))
    fresh = Job.objects.create(type="T_OK", vault=vault, state=JobState.RUNNING, heartbeat_at=timezone.now())
    reaped = jobs_reap(timeout_seconds=300)
    assert reaped == [str(stale.pk)]
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.state == JobState.FAILED and "stopped reporting" in stale.error
    assert fresh.state == JobState.RUNNING
    assert Alert.objects.filter(job=stale).exists()
