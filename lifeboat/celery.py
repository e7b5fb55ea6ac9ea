import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lifeboat.settings")

app = Celery("lifeboat")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
def _tune_worker(**_kwargs) -> None:
    """Apply tasks decrypt, decompress and write batch-sized buffers: keep them in the heap
    (see mobility.tuning). Prefork children inherit the setting."""
    from mobility.tuning import tune_allocator

    tune_allocator()
