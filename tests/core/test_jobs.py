"""The job engine on a real Celery worker and the real broker."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.utils import timezone

from core.choices import JobState
from core.exceptions import LifeboatError
from core.jobs import HANDLERS, JobHandler, job_cancel, job_create, job_execute, job_wake, jobs_reap
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


GATE: dict[str, bool] = {}
UNSERVED = "test-unserved"  # a queue no worker of the tests consumes
HOOKED: list[str] = []


def _first(ctx):
    CALLS.append("first")
    ctx.summary("Did the first thing.")
    return {"n": 7}


def _gated(ctx, key):
    CALLS.append("gated")
    if not GATE.get(key):
        ctx.wait(f"Waiting for {key}.", key=key, check_after=3600, progress=40)
    ctx.summary(f"{key} arrived.")


def _event_waiter(ctx):
    """Waits for an event between two steps; the first step never runs twice."""
    first = ctx.run_step("First", _first, ctx)
    ctx.run_step("Gate", _gated, ctx, ctx.params["key"])
    return {"first": first}


def _action_waiter(ctx):
    resumed = ctx.run_step("Approve", lambda: ctx.wait_for_action("approve", "Waiting for an administrator to approve."))
    return {"approved_by": resumed["by"]}


def _parent(ctx):
    def spawn():
        for n in range(2):
            job_create(job_type="T_OK", target_type="test", target_id=str(n), parent=ctx.job, steps=["First", "Second"])

    ctx.run_step("Start children", spawn)
    children = ctx.run_step("Wait for children", lambda: [c.state for c in ctx.wait_for_children("Waiting for the items.")])
    return {"children": children}


@pytest.fixture(autouse=True)
def handlers():
    HANDLERS.update({
        "T_OK": JobHandler(run=_ok, queue="control"),
        "T_FAIL": JobHandler(run=_fails, queue="control"),
        "T_CRASH": JobHandler(run=_crashes, queue="control"),
        "T_WAIT": JobHandler(run=_waits, queue="control"),
        "T_EVENT": JobHandler(run=_event_waiter, queue="data", on_failure=lambda job, error: HOOKED.append(error)),
        "T_ACTION": JobHandler(run=_action_waiter, queue="control"),
        "T_PARENT": JobHandler(run=_parent, queue="control"),
        "T_UNSERVED": JobHandler(run=_ok, queue=UNSERVED),
    })
    CALLS.clear()
    RELEASE.clear()
    GATE.clear()
    HOOKED.clear()
    yield
    RELEASE.set()
    for key in ("T_OK", "T_FAIL", "T_CRASH", "T_WAIT", "T_EVENT", "T_ACTION", "T_PARENT", "T_UNSERVED"):
        HANDLERS.pop(key)


def _start(job_type, vault=None, params=None):
    from django.db import transaction

    with transaction.atomic():
        return job_create(job_type=job_type, vault=vault, target_type="test", target_id="1", target_name="thing", params=params,
                          steps=["First", "Second"] if job_type == "T_OK" else None)


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
    from django.db import transaction

    with transaction.atomic():  # cancelled before its message goes out: a worker never gets to claim it
        job = job_create(job_type="T_OK", target_type="test", target_id="1", target_name="thing")
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


# --- waiting is a state -----------------------------------------------------------------------


def _state(job, state):
    return wait_for(lambda: Job.objects.filter(pk=job.pk, state=state).first(), message=f"job {job.pk} to be {state}")


def test_a_waiting_job_gives_its_worker_back_and_resumes_on_its_event(celery_worker):
    jobs = [_start("T_EVENT", params={"key": f"gate-{n}"}) for n in range(12)]  # 12 waiting jobs, 4 worker threads
    for job in jobs:
        waiting = _state(job, JobState.WAITING)
        assert waiting.waiting_for == f"Waiting for gate-{jobs.index(job)}."
        assert [s["state"] for s in waiting.steps] == ["SUCCEEDED", "WAITING"]
        assert waiting.steps[1]["message"] == waiting.waiting_for and waiting.steps[1]["progress"] == 40
    # Every worker thread is free: a new job runs to its end meanwhile.
    assert _wait_terminal(_start("T_OK")).state == JobState.SUCCEEDED
    for n, job in enumerate(jobs):
        GATE[f"gate-{n}"] = True
        assert job_wake(f"gate-{n}") == 1
    for job in jobs:
        done = _wait_terminal(job)
        assert done.state == JobState.SUCCEEDED, done.error
        assert done.result == {"first": {"n": 7}}
        assert [s["message"] for s in done.steps] == ["Did the first thing.", f"gate-{jobs.index(job)} arrived."]
        assert done.progress == 100 and not done.waiting_for and done.wait_key == ""
    # The first step ran once per job, the gated one twice (once waiting, once going on).
    assert CALLS.count("first") == 12 and CALLS.count("gated") == 24


def test_a_wake_for_another_key_leaves_the_job_waiting(celery_worker):
    job = _start("T_EVENT", params={"key": "mine"})
    _state(job, JobState.WAITING)
    assert job_wake("not-mine") == 0
    assert Job.objects.get(pk=job.pk).state == JobState.WAITING


def test_cancel_a_waiting_job_ends_it_at_once_and_runs_its_failure_hook(celery_worker, vault):
    job = _start("T_EVENT", vault=vault, params={"key": "never"})
    _state(job, JobState.WAITING)
    job_cancel(job_id=job.pk)
    done = Job.objects.get(pk=job.pk)
    assert done.state == JobState.CANCELLED and done.error == "Cancelled by an administrator."
    assert HOOKED == ["Cancelled by an administrator."]
    GATE["never"] = True
    assert job_wake("never") == 0  # a cancelled job is never woken again
    assert Job.objects.get(pk=job.pk).state == JobState.CANCELLED


def test_resume_gives_a_manual_action_through_the_api(celery_worker, api):
    job = _start("T_ACTION")
    _state(job, JobState.WAITING)
    response = api.post(f"/api/v1/replicationJobs/{job.pk}/resume/")
    assert response.status_code == 200, response.content
    done = _wait_terminal(job)
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.result == {"approved_by": "admin"}
    again = api.post(f"/api/v1/replicationJobs/{job.pk}/resume/")
    assert again.status_code == 409
    assert again.json()["error"]["message"] == "This job is succeeded, not waiting; there is nothing to resume."


def test_a_parent_job_waits_for_its_children(celery_worker):
    parent = _start("T_PARENT")
    done = _wait_terminal(parent)
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.result == {"children": ["SUCCEEDED", "SUCCEEDED"]}
    assert Job.objects.filter(parent=parent.pk, state=JobState.SUCCEEDED).count() == 2


def test_a_job_the_reaper_failed_is_never_written_succeeded(transactional_db):
    from django.db import connection

    job = _start("T_WAIT")

    def run():
        try:
            job_execute(job_id=str(job.pk))
        finally:
            connection.close()

    worker = threading.Thread(target=run)
    worker.start()
    _state(job, JobState.RUNNING)
    assert jobs_reap(timeout_seconds=-60) == [str(job.pk)]  # its heartbeat counts as too old
    RELEASE.set()  # the handler goes on after the reaper failed the job, and ends
    worker.join(timeout=30)
    assert not worker.is_alive()
    done = Job.objects.get(pk=job.pk)
    assert done.state == JobState.FAILED and "stopped reporting" in done.error


# --- lost messages -----------------------------------------------------------------------------


def _queue_len(queue: str) -> int:
    from lifeboat.celery import app

    with app.connection_for_write() as conn:
        return conn.default_channel.client.llen(queue)


def _drop_queue(queue: str) -> None:
    """What a broker restarted without persistence does to the messages it held."""
    from lifeboat.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.client.delete(queue)


def test_a_lost_message_is_sent_again_then_the_job_fails_with_a_sentence(transactional_db):
    _drop_queue(UNSERVED)
    job = _start("T_UNSERVED")  # no worker serves its queue: the message waits in the broker
    assert _queue_len(UNSERVED) == 1
    _drop_queue(UNSERVED)
    for sends in (2, 3):
        assert jobs_reap(queue_timeout_seconds=-1) == []
        again = Job.objects.get(pk=job.pk)
        assert again.state == JobState.QUEUED and again.sends == sends
        assert _queue_len(UNSERVED) == 1  # sent again
        _drop_queue(UNSERVED)
    assert jobs_reap(queue_timeout_seconds=-1) == [str(job.pk)]
    failed = Job.objects.get(pk=job.pk)
    assert failed.state == JobState.FAILED
    assert failed.error.startswith("No worker took this job: its message was sent 3 times and never picked up")
    job_execute(job_id=str(job.pk))  # a late copy of the message changes nothing
    assert Job.objects.get(pk=job.pk).state == JobState.FAILED and CALLS == []


def test_a_resent_message_runs_the_job_once(celery_worker):
    job = Job.objects.create(type="T_OK", state=JobState.QUEUED, queue="control", celery_task_id="lost",
                             queued_at=timezone.now() - timedelta(minutes=10))
    assert jobs_reap(queue_timeout_seconds=60) == []
    done = _wait_terminal(job)
    assert done.state == JobState.SUCCEEDED and done.sends == 2
    assert CALLS == [str(job.pk)]


# --- the job state machine ------------------------------------------------------------------------

import itertools  # noqa: E402

from core.exceptions import InvalidTransition  # noqa: E402
from core.transitions import JOB, JOB_TRANSITIONS, transition  # noqa: E402

JOB_EXPECTED = {
    ("QUEUED", "RUNNING"), ("QUEUED", "CANCELLED"), ("QUEUED", "FAILED"),
    ("RUNNING", "SUCCEEDED"), ("RUNNING", "FAILED"), ("RUNNING", "WAITING"), ("RUNNING", "CANCELLING"),
    ("WAITING", "QUEUED"), ("WAITING", "CANCELLED"), ("WAITING", "FAILED"),
    ("CANCELLING", "CANCELLED"), ("CANCELLING", "FAILED"), ("CANCELLING", "SUCCEEDED"),
}
JOB_STATES = [s.value for s in JobState]


def test_job_table_is_the_designed_one():
    assert set(JOB.cells()) == JOB_EXPECTED
    assert set(JOB_TRANSITIONS) == set(JOB_STATES)


@pytest.mark.parametrize("source,target", list(itertools.product(JOB_STATES, JOB_STATES)))
def test_every_job_cell(db, source, target):
    job = Job.objects.create(type="T_OK", state=source)
    if (source, target) in JOB_EXPECTED:
        assert transition(JOB, model=Job, pk=job.pk, to_state=target, operation="move").state == target
    else:
        with pytest.raises(InvalidTransition) as err:
            transition(JOB, model=Job, pk=job.pk, to_state=target, operation="move")
        assert err.value.current_state == source
        assert transition(JOB, model=Job, pk=job.pk, to_state=target, operation="move", quiet=True) is None
        assert Job.objects.get(pk=job.pk).state == source
