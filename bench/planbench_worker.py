"""The Celery app of ``bench_plan_rto.py --profile``: Lifeboat's own app, with every task of each
worker process run under cProfile; each process writes its profile when it shuts down."""
from __future__ import annotations

import cProfile
import os

from celery.signals import task_postrun, task_prerun, worker_process_shutdown

from lifeboat.celery import app  # noqa: F401 - the app celery -A loads

_profile = cProfile.Profile()


@task_prerun.connect
def _start(**_kwargs) -> None:
    _profile.enable()


@task_postrun.connect
def _stop(**_kwargs) -> None:
    _profile.disable()


@worker_process_shutdown.connect
def _write(**_kwargs) -> None:
    _profile.dump_stats(os.path.join(os.environ["LIFEBOAT_BENCH_PROFILE_DIR"], f"worker-{os.getpid()}.prof"))
