"""A failed resynchronization shows its error on the item and retries by itself with backoff
(5 minutes, doubling, at most 4 hours) in the off-hours window; points that are not
crash-consistent are never the default for a failover. Real database; the off-hours sweep is
called with the time it runs at (the end-to-end window test runs it on the real worker)."""
from __future__ import annotations

from datetime import time as dtime, timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from core.choices import JobType
from core.exceptions import ValidationFailed
from core.models import Job
from replication.models import ProtectedItem
from replication.scheduling import items_resync_in_offhours, resync_retry_delay
from tests.factories import ProtectedItemFactory, RecoveryPointFactory


@pytest.fixture
def item(db):
    item = ProtectedItemFactory()
    item.vault.off_hours_start = item.vault.off_hours_end = dtime(0, 0)  # the whole day
    item.vault.save()
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="RESYNCING")
    return item


def fail_resync(item, error: str = "The mobility agent did not start the resynchronization within 2 minutes."):
    """What the job engine does when the resync job fails: its failure hook."""
    from replication.jobs import _resync_failed

    job = Job.objects.create(type=JobType.RESYNC, vault=item.vault, target_type="protected_item",
                             target_id=str(item.pk), target_name=item.name)
    _resync_failed(job, error)
    item.refresh_from_db()
    return item


def test_backoff_doubles_from_five_minutes_up_to_four_hours():
    assert [resync_retry_delay(attempts=n) for n in (1, 2, 3, 4, 5, 6, 7, 12)] == [
        timedelta(minutes=m) for m in (5, 10, 20, 40, 80, 160, 240, 240)]


def test_failed_resync_shows_its_error_and_waits_out_the_backoff(item, api, client, admin_user):
    before = timezone.now()
    item = fail_resync(item)
    assert item.protection_state == "RESYNC_REQUIRED" and item.resync_attempts == 1
    assert before + timedelta(minutes=5) <= item.resync_retry_at <= timezone.now() + timedelta(minutes=5)
    assert "within 2 minutes" in item.last_error and "retried by itself" in item.last_error

    body = api.get(f"/api/v1/replicationProtectedItems/{item.pk}/").json()
    assert body["resync_attempts"] == 1 and body["resync_retry_at"] and "within 2 minutes" in body["last_error"]
    client.force_login(admin_user)
    page = client.get(reverse("portal:item-detail", args=[item.pk])).content.decode()
    assert "Failed resyncs" in page and "Resynchronize now" in page

    # The off-hours sweep leaves it alone until the backoff has passed ...
    assert items_resync_in_offhours(now=item.resync_retry_at - timedelta(seconds=1)) == 0
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == "RESYNC_REQUIRED"
    # ... then tries again; a second failure waits twice as long.
    assert items_resync_in_offhours(now=item.resync_retry_at) == 1
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == "RESYNCING"
    first_retry = item.resync_retry_at
    item = fail_resync(item, "The resynchronization pass ends behind the replica.")
    assert item.resync_attempts == 2 and item.resync_retry_at - timezone.now() > timedelta(minutes=9)
    assert item.resync_retry_at > first_retry and "2 in a row" in item.last_error


def test_backoff_does_not_hold_back_resynchronize_now_and_success_clears_it(item, api):
    item = fail_resync(item)
    r = api.post(f"/api/v1/replicationProtectedItems/{item.pk}/repairReplication")
    assert r.status_code == 202, r.content
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="PROTECTED")  # the resync succeeded
    items_resync_in_offhours()
    item.refresh_from_db()
    assert (item.resync_attempts, item.resync_retry_at) == (0, None)


def test_a_hook_for_an_item_that_left_resyncing_changes_nothing(item):
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state="FAILOVER_IN_PROGRESS")
    item = fail_resync(item)
    assert item.protection_state == "FAILOVER_IN_PROGRESS" and item.resync_attempts == 0


def test_latest_point_is_never_one_that_is_not_crash_consistent(item):
    from recovery_plans.services import recovery_point_choose

    mixed = RecoveryPointFactory(item=item, seq=5, type="not_crash_consistent")
    with pytest.raises(ValidationFailed, match="not crash-consistent"):
        recovery_point_choose(item=item, point="latest")
    good = RecoveryPointFactory(item=item, seq=3, type="crash_consistent")
    assert recovery_point_choose(item=item, point="latest") == good
    assert recovery_point_choose(item=item, point="latest_processed") == good
    assert recovery_point_choose(item=item, point="custom", recovery_point_id=mixed.pk) == mixed
