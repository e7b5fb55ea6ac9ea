"""Recovery in a real Chromium, on real parts: a simulated VMware VM writing data, its agent,
a process server process, a Celery worker applying into local storage, and a simulated
recovery site. An admin drills the VM (Test failover -> running and verified -> Cleanup),
then fails it over (planned), changes its recovery point and commits, by clicking through the
portal; each recovered disk is compared byte for byte with what it must hold.

The browser, the live server and the worker are set up as in ``test_browser.py``: ORM calls
made while the browser is open run in a thread of their own (``_in_thread``).
"""
from __future__ import annotations

import hashlib
import re
from contextlib import ExitStack

import pytest
from django.test import override_settings

from core.choices import JobState
from core.models import Job
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import wait_for
from tests.e2e.harness import MiB, Site, process_server
from tests.portal.test_browser import _in_thread, browser_page  # noqa: F401 - browser_page is a fixture

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

JOB_TIMEOUT_MS = 240_000
VMS = [{
    "name": "app-br", "disks": [8 * MiB, 4 * MiB],
    "workload": {"rate_bytes_per_s": MiB, "write_size": 64 * 1024, "pattern": "hotspot"},
}]


def _sha(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def protected(tmp_path, live_server, celery_worker, admin_user):
    """app-br protected through the services, with recovery points, mapped to dr-site."""
    from replication.services import protected_item_enable
    from vault.services import recovery_site_create

    site = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS, crash_interval=5)
    with ExitStack() as stack:
        stack.callback(site.close)
        # A planned failover that cannot drain fails within the test's wait, not in ten minutes.
        stack.enter_context(override_settings(LIFEBOAT_FAILOVER_DRAIN_TIMEOUT=120))
        writer = site.start_workload()

        def stop_writer():
            writer.set()
            writer.thread.join(timeout=10)

        stack.callback(stop_writer)
        stack.enter_context(process_server(site.ps_config(), site.tmp))
        site.start_agents()
        site.start_beat()
        recovery = recovery_site_create(
            vault=site.vault, name="dr-site", kind="simulated", host=str(tmp_path / "dr-site"),
            networks=[{"name": "recovery-net", "purpose": "RECOVERY"}, {"name": "test-net", "purpose": "TEST"}],
        )
        machine = site.vault.machines.get(name="app-br")
        item, job = protected_item_enable(vault=site.vault, machine=machine, policy=site.policy, process_server=site.ps,
                                          recovery_site=recovery, user=admin_user)
        job = wait_for(lambda: Job.objects.filter(pk=job.pk, state__in=JobState.TERMINAL).first(), timeout=240,
                       message="enable replication")
        assert job.state == JobState.SUCCEEDED, job.error
        wait_for(lambda: RecoveryPoint.objects.filter(item=item).count() >= 3, timeout=120, message="three recovery points")
        yield {"site": site, "item": ProtectedItem.objects.select_related("machine").get(pk=item.pk), "recovery": recovery,
               "test_net": recovery.networks.get(name="test-net").pk}


def _point_sha(item: ProtectedItem, point_id: str, disk_index: int) -> str:
    from replication.engine import disk_image_stream

    point = RecoveryPoint.objects.get(item=item, point_id=point_id)
    _size, chunks = disk_image_stream(item=item, point=point, disk_index=disk_index)
    return _sha(chunks)


def _recovered_sha(recovery, vm_id: str, disk_index: int) -> str:
    with recovery.connector() as connector:
        return _sha(connector.read_disk(vm_id, disk_index))


def _site_vm_ids(recovery) -> set[str]:
    with recovery.connector() as connector:
        return {v.vm_id for v in connector.list_vms()}


def _current_vm(item, kind):
    return item.recovered_vms.get(kind=kind, removed_at__isnull=True)


def _wait_job(page, *, expect_text: str):
    """On a job's page: it ends Succeeded and its steps say ``expect_text``."""
    from playwright.sync_api import expect

    try:
        expect(page.locator("#job-state")).to_have_text(re.compile("Succeeded|Failed"), timeout=JOB_TIMEOUT_MS)
    except AssertionError:
        pytest.fail(f"the job did not end: {page.locator('#job-progress').inner_text()}")
    assert page.locator("#job-state").inner_text() == "Succeeded", page.locator("#job-progress").inner_text()
    expect(page.locator("#job-progress[hx-trigger]")).to_have_count(0)  # polling stopped
    expect(page.locator("#job-progress")).to_contain_text(expect_text)


def test_drill_then_fail_over_change_point_and_commit_in_chromium(live_server, protected, browser_page):
    from playwright.sync_api import expect

    page, problems = browser_page
    item, recovery, site = protected["item"], protected["recovery"], protected["site"]
    base = live_server.url

    page.goto(f"{base}/items/{item.pk}/")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("admin-pass-123")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.locator("h1")).to_have_text("app-br")
    status = page.locator("#item-status")
    expect(status.get_by_role("link", name="Commit", exact=True)).to_have_count(0)
    expect(status.get_by_role("link", name="Cleanup test failover", exact=True)).to_have_count(0)

    # --- Test failover: the drill ------------------------------------------------------------
    status.get_by_role("link", name="Test failover", exact=True).click()
    expect(page.locator("h1")).to_have_text("Test failover: app-br")
    expect(page.get_by_label("Test network")).to_have_value(str(protected["test_net"]))
    # The same form open in a second tab: its submit comes second.
    second = page.context.new_page()
    second.goto(page.url)
    for tab in (page, second):
        tab.get_by_label("Recovery point", exact=True).select_option("latest_processed")
        tab.get_by_label("Start a test failover of app-br; replication goes on untouched").check()
    page.get_by_role("button", name="Start test failover", exact=True).click()
    expect(page.locator("h1")).to_have_text("Test failover: app-br")  # the job's page
    expect(page.locator("#job-target")).to_have_text("app-br")
    job_url = page.url

    # The second submit while the first runs: the 409 sentence on the form, not a traceback.
    second.get_by_role("button", name="Start test failover", exact=True).click()
    expect(second.locator("#recovery-form .error")).to_contain_text("Cannot test failover 'app-br' now: test failover")
    second.close()
    _wait_job(page, expect_text="2 disks verified")

    # The drill's VM exists: its form is no longer offered.
    page.goto(f"{base}/items/{item.pk}/recovery/test-failover/")
    expect(page.locator("ul.messages")).to_contain_text("Test failover is not possible now")
    page.goto(job_url)
    page.locator("#job-target").click()
    expect(page.locator("h1")).to_have_text("app-br")
    test_vm = page.locator("#recovered-vm-test")
    expect(test_vm).to_contain_text("Running")
    expect(test_vm).to_contain_text("test-net")
    expect(test_vm).to_contain_text("dr-site")
    expect(test_vm).to_contain_text("2 disks verified")
    page.screenshot(path="/tmp/lifeboat-test-failover.png", full_page=True)

    vm = _in_thread(lambda: _current_vm(item, "TEST"))
    for disk in (0, 1):
        assert _in_thread(lambda: _recovered_sha(recovery, vm.vm_id, disk)) == _in_thread(
            lambda: _point_sha(item, vm.point_id, disk)), f"test VM disk {disk} differs from its recovery point"

    # --- Cleanup ------------------------------------------------------------------------------
    page.locator("#item-status").get_by_role("link", name="Cleanup test failover", exact=True).click()
    page.get_by_label("Notes").fill("Drill: booted, disks verified.")
    page.get_by_label("Delete the test VM of app-br and its disks").check()
    page.get_by_role("button", name="Clean up", exact=True).click()
    _wait_job(page, expect_text="removed")
    page.locator("#job-target").click()
    expect(page.locator("#recovered-vm-test")).to_have_count(0)
    drill = _in_thread(lambda: item.recovered_vms.get(pk=vm.pk))
    assert drill.removed_at is not None and drill.cleanup_notes == "Drill: booted, disks verified."
    assert vm.vm_id not in _in_thread(lambda: _site_vm_ids(recovery))

    # --- Planned failover ---------------------------------------------------------------------
    page.locator("#item-status").get_by_role("link", name="Failover", exact=True).click()
    expect(page.get_by_label(re.compile("Planned:"))).to_be_checked()
    page.get_by_label("Type the VM's name, app-br, to fail it over").fill("app-br ")
    page.get_by_role("button", name="Fail over", exact=True).click()
    _wait_job(page, expect_text="2 disks verified")
    page.locator("#job-target").click()
    expect(page.locator("#protection-state")).to_have_text("Failed over")
    failover_vm = page.locator("#recovered-vm-failover")
    expect(failover_vm).to_contain_text("Running")
    expect(failover_vm).to_contain_text("recovery-net")
    expect(page.locator("#item-status").get_by_role("link", name="Failover", exact=True)).to_have_count(0)

    # Every byte the source held when it was shut down is on the recovered disks.
    vm = _in_thread(lambda: _current_vm(item, "FAILOVER"))
    source = site.site
    machine = item.machine
    for replica in _in_thread(lambda: list(item.replica_disks.all())):
        with open(source.disk_path(machine.instance_uuid, replica.source_disk_key), "rb") as f:
            source_sha = _sha(iter(lambda: f.read(4 * MiB), b""))
        assert _in_thread(lambda: _recovered_sha(recovery, vm.vm_id, replica.index)) == source_sha, (
            f"failed-over disk {replica.index} differs from the source disk after shutdown")

    # --- Change recovery point: an older one ----------------------------------------------------
    older = _in_thread(lambda: RecoveryPoint.objects.filter(item=item).order_by("seq").first())
    page.locator("#item-status").get_by_role("link", name="Change recovery point", exact=True).click()
    page.get_by_label("Recovery point", exact=True).select_option(str(older.pk))
    page.get_by_label("Power off the failed-over VM of app-br and replace its disks with this point's").check()
    page.get_by_role("button", name="Change recovery point", exact=True).click()
    _wait_job(page, expect_text="2 disks verified")
    vm = _in_thread(lambda: _current_vm(item, "FAILOVER"))
    assert vm.point_id == older.point_id
    for disk in (0, 1):
        assert _in_thread(lambda: _recovered_sha(recovery, vm.vm_id, disk)) == _in_thread(
            lambda: _point_sha(item, older.point_id, disk)), f"disk {disk} differs from the point it was changed to"

    # --- Commit ---------------------------------------------------------------------------------
    page.locator("#job-target").click()
    page.locator("#item-status").get_by_role("link", name="Commit", exact=True).click()
    page.get_by_label("Type the VM's name, app-br, to commit its failover").fill("app-br")
    page.get_by_role("button", name="Commit", exact=True).click()
    _wait_job(page, expect_text="kept the one app-br came from")
    page.locator("#job-target").click()
    expect(page.locator("#protection-state")).to_have_text("Failover committed")
    for label in ("Test failover", "Failover", "Change recovery point", "Commit"):
        expect(page.locator("#item-status").get_by_role("link", name=label, exact=True)).to_have_count(0)
    expect(page.locator("#recovered-vm-failover")).to_contain_text("Running")
    page.screenshot(path="/tmp/lifeboat-failover-committed.png", full_page=True)
    page.close()
    assert not problems, "\n".join(problems)

    # Commit kept the point the VM runs from; the VM still holds exactly its bytes.
    committed = _in_thread(lambda: _current_vm(item, "FAILOVER"))
    assert committed.point_id == older.point_id
    assert _in_thread(lambda: RecoveryPoint.objects.filter(item=item, point_id=older.point_id).exists())
    for disk in (0, 1):
        assert _in_thread(lambda: _recovered_sha(recovery, committed.vm_id, disk)) == _in_thread(
            lambda: _point_sha(item, older.point_id, disk)), f"committed disk {disk} differs from its recovery point"
