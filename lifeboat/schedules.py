"""Every periodic task, in one place. Crontab for anything of a minute or more."""
from datetime import timedelta

from celery.schedules import crontab

BEAT_SCHEDULE = {
    "apply-sweep": {"task": "replication.apply_sweep", "schedule": timedelta(seconds=5)},
    "monitor": {"task": "replication.monitor", "schedule": timedelta(seconds=30)},
    "reap-jobs": {"task": "core.reap_jobs", "schedule": timedelta(seconds=15)},
    # Waiting jobs due a look (most are woken by their event before that).
    "wake-jobs": {"task": "core.wake_jobs", "schedule": timedelta(seconds=3)},
    "rediscover": {"task": "vault.rediscover", "schedule": crontab(minute="*")},
    "app-consistent": {"task": "replication.app_consistent_sweep", "schedule": crontab(minute="*")},
    # Replication groups' shared points (each group's own frequency decides; see replication/groups.py).
    "group-points": {"task": "replication.group_points_sweep", "schedule": timedelta(seconds=30)},
    "offhours-resync": {"task": "replication.offhours_resync", "schedule": crontab(minute="*/5")},
}
