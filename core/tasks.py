from celery import shared_task

from core.jobs import job_execute, jobs_reap, jobs_wake_due


# Not acks_late: a job that dies with its worker is failed by the reaper, with a reason,
# rather than run again behind the admin's back.
@shared_task(name="core.run_job", ignore_result=True)
def run_job(job_id: str) -> None:
    job_execute(job_id=job_id)


@shared_task(name="core.reap_jobs", ignore_result=True)
def reap_jobs() -> int:
    return len(jobs_reap())


@shared_task(name="core.wake_jobs", ignore_result=True)
def wake_jobs() -> int:
    """Queue again the waiting jobs whose time to look again has come."""
    return jobs_wake_due()
