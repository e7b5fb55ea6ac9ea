from celery import shared_task

from core.exceptions import Conflict
from vault.discovery import vcenter_discover, vcenters_due_for_discovery


@shared_task(name="vault.rediscover", ignore_result=True)
def rediscover() -> int:
    """Start discovery of every endpoint whose interval has passed."""
    started = 0
    for vcenter in vcenters_due_for_discovery():
        try:
            vcenter_discover(vcenter=vcenter)
            started += 1
        except Conflict:
            pass  # already running
    return started
