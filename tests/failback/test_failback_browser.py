"""Failback in a real Chromium, on real parts: after a committed failover of a simulated VMware
VM, an admin brings it home by clicking through its Failback card — Reprotect, Fail over to
on-premises (planned), Commit, Re-enable replication — while the recovered VM writes in the
recovery site; after the failback the on-premises disk files hold exactly the recovered VM's
bytes.

The site is built as in ``test_failback_e2e.py`` (two process server processes, one on each
side; the agents of both simulated sites; a Celery worker; beat). Protection, the planned
failover and its commit are set up through the services, since ``test_recovery_browser.py``
already clicks those. The browser, its sign-in and the job waits are those of the portal's
browser tests: ORM calls made while the browser is open run in a thread of their own
(``_in_thread``).
"""
from __future__ import annotations

import re
import threading
from contextlib import ExitStack

import pytest
from django.test import override_settings

from core.choices import JobState
from core.models import Job
from failback.models import Failback
from recovery_plans.models import RecoveredVm
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import wait_for
from tests.e2e.harness import MiB, Site, free_port, process_server
from tests.failback.test_failback_e2e import Writes, _file_shas, _recovered_shas
from tests.portal.test_browser import _in_thread, browser_page  # noqa: F401 - browser_page is a fixture
from tests.portal.test_recovery_browser import _wait_job

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

VMS = [{
    "name": "app-fb", "disks": [16 * MiB, 8 * MiB],
    "workload": {"rate_bytes_per_s": 256 * 1024, "write_size": 16 * 1024, "pattern": "hotspot"},
}]
FAILBACK_BUTTONS = ("Reprotect", "Fail over to on-premises", "Commit", "Re-enable replication")


def _terminal(job_id, what: str) -> Job:
    job = wait_for(lambda: Job.objects.filter(pk=job_id, state__in=JobState.TERMINAL).first(), timeout=240, message=what)
    assert job.state == JobState.SUCCEEDED, f"{what}: {job.error}"
    return job


@pytest.fixture
def committed(tmp_path, live_server, celery_worker, admin_user):
    """app-fb protected, failed over (planned) and committed through the services, with both
    sides running; the recovered VM writes in the recovery site, as the business would."""
    from replication.agent_host import AgentHost
    from replication.process_servers import process_server_config
    from replication.services import protected_item_enable
    from recovery_plans.services import protected_item_failover_commit, protected_item_planned_failover
    from vault import services as vault_services
    from vault.connectors.recovery_sim import _LocalSite
    from vault.connectors.simsite import run_workload

    site = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS, crash_interval=5)
    with ExitStack() as stack:
        stack.callback(site.close)
        # A planned failover (either way) that cannot drain fails within the test's wait.
        stack.enter_context(override_settings(LIFEBOAT_FAILOVER_DRAIN_TIMEOUT=120))
        recovery_dir = tmp_path / "recovery"
        recovery = vault_services.recovery_site_create(
            vault=site.vault, name="recovery-site", host=str(recovery_dir),
            networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")],
        )
        ps_back = vault_services.process_server_create(vault=site.vault, name="ps-recovery", host="127.0.0.1",
                                                       data_port=free_port(), site="RECOVERY")
        vault_services.master_target_server_create(vault=site.vault, name="mt-01", host="127.0.0.1")
        back_config = process_server_config(server=ps_back, cache_dir=str(tmp_path / "ps-back-cache"))
        back_config["report_interval"] = 1.0
        (tmp_path / "ps-fwd").mkdir()
        (tmp_path / "ps-back").mkdir()
        writer = site.start_workload()

        def stop_writer():
            writer.set()
            writer.thread.join(timeout=10)

        stack.callback(stop_writer)
        stack.enter_context(process_server(site.ps_config(), tmp_path / "ps-fwd"))
        stack.enter_context(process_server(back_config, tmp_path / "ps-back"))
        site.start_agents()
        site.start_beat()
        back_agents = AgentHost(str(recovery_dir), scan_interval=0.2, heartbeat_interval=1.0, assignment_interval=0.5)
        back_agents.stop = site._stop
        threading.Thread(target=back_agents.run, daemon=True, name="recovery-agents").start()

        machine = site.vault.machines.get(name="app-fb")
        item, job = protected_item_enable(vault=site.vault, machine=machine, policy=site.policy, process_server=site.ps,
                                          recovery_site=recovery, user=admin_user)
        _terminal(job.pk, "enable replication")
        wait_for(lambda: RecoveryPoint.objects.filter(item=item).exists(), timeout=120, message="a recovery point")
        _, job = protected_item_planned_failover(item=item, user=admin_user)
        _terminal(job.pk, "planned failover")
        stop_writer()
        _, job = protected_item_failover_commit(item=item, user=admin_user)
        _terminal(job.pk, "failover commit")
        vm = RecoveredVm.objects.select_related("site").get(item=item, kind="FAILOVER", removed_at__isnull=True)

        # The business runs in the recovery site: the recovered VM writes.
        written = Writes()
        recovered_site = _LocalSite(str(recovery_dir), "", "")
        recovered_site.connect()
        stop_recovered = threading.Event()
        recovered_writer = threading.Thread(target=run_workload, args=(recovered_site, stop_recovered),
                                            kwargs={"seed": 11, "on_write": written}, daemon=True)
        recovered_writer.start()

        def stop_recovered_writer():
            stop_recovered.set()
            recovered_writer.join(timeout=10)

        stack.callback(stop_recovered_writer)
        wait_for(lambda: written.bytes >= 256 * 1024, timeout=60, message="the recovered VM writing")
        yield {
            "site": site, "item": ProtectedItem.objects.select_related("machine").get(pk=item.pk), "vm": vm,
            "recovered_site": recovered_site, "written": written, "stop_recovered_writer": stop_recovered_writer,
            "onprem": {d.index: site.site.disk_path(machine.instance_uuid, d.source_disk_key)
                       for d in item.replica_disks.all()},
        }


def _card_buttons(page) -> list[str]:
    """The failback card's buttons and its state, read at once (the card is swapped every 5 s)."""
    return page.locator("#item-failback").evaluate(
        "card => [card.querySelector('.failback-state')?.textContent.trim() ?? '',"
        " ...[...card.querySelectorAll('a.button')].map(a => a.textContent.trim())]")


def _expect_only_button(page, allowed: str):
    """The failback card offers ``allowed`` and none of the other failback buttons."""
    from playwright.sync_api import expect

    card = page.locator("#item-failback")
    expect(card.get_by_role("link", name=allowed, exact=True)).to_be_visible()
    for label in FAILBACK_BUTTONS:
        if label != allowed:
            expect(card.get_by_role("link", name=label, exact=True)).to_have_count(0)


def test_failback_round_trip_in_chromium(live_server, committed, browser_page):
    from playwright.sync_api import expect

    page, problems = browser_page
    item, vm, written = committed["item"], committed["vm"], committed["written"]
    base = live_server.url
    item_url = f"{base}/items/{item.pk}/"

    page.goto(item_url)
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("admin-pass-123")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.locator("h1")).to_have_text("app-fb")
    expect(page.locator("#protection-state")).to_have_text("Failover committed")
    # Before a reprotect there is nothing to fail over to on-premises: only Reprotect is offered,
    # and the failback form itself sends the admin back with the reason.
    _expect_only_button(page, "Reprotect")
    page.goto(f"{base}/items/{item.pk}/failback/failback/")
    expect(page).to_have_url(item_url)
    expect(page.locator("ul.messages")).to_contain_text(
        "Fail over to on-premises is not possible now: app-fb is failover committed.")

    # --- Reprotect, to the original VM ----------------------------------------------------------
    page.locator("#item-failback").get_by_role("link", name="Reprotect", exact=True).click()
    expect(page.locator("h1")).to_have_text("Reprotect: app-fb")
    expect(page.get_by_label(re.compile("Original location"))).to_be_checked()
    expect(page.get_by_label("Process server in the recovery site")).to_have_value(
        str(_in_thread(lambda: item.vault.process_servers.get(name="ps-recovery").pk)))
    # Without the confirmation the browser does not submit.
    page.get_by_role("button", name="Reprotect", exact=True).click()
    expect(page.locator("h1")).to_have_text("Reprotect: app-fb")
    assert not _in_thread(lambda: Failback.objects.filter(item=item).exists())
    page.get_by_label("Replicate app-fb's recovered VM back on-premises (only what differs is sent to its original VM)").check()
    page.get_by_role("button", name="Reprotect", exact=True).click()
    expect(page.locator("h1")).to_have_text("Reprotect (replicate back to on-premises): app-fb")

    _wait_job(page, expect_text="app-fb replicates to on-premises through ps-recovery")
    written_at_reprotect = written.bytes

    # --- The item's page: the failback card, and the returning replication -----------------------
    page.locator("#job-target").click()
    expect(page.locator("h1")).to_have_text("app-fb")
    card = page.locator("#item-failback")
    expect(card.locator(".failback-state")).to_have_text("Replicating to on-premises")
    expect(card).to_contain_text("ps-recovery (recovery site) → mt-01 (on-premises)")
    _expect_only_button(page, "Fail over to on-premises")
    returning = _in_thread(lambda: Failback.objects.get(item=item).returning_item)
    card.locator("dt:text-is('Replicating back') + dd a").click()
    expect(page).to_have_url(f"{base}/items/{returning.pk}/")
    expect(page.locator("h1")).to_have_text("app-fb")
    expect(page.locator("#item-status dt:text-is('Direction') + dd")).to_have_text("Recovery to primary")
    expect(page.locator("#item-failback .failback-state")).to_have_text("Replicating to on-premises")
    expect(page.locator("#item-failback")).to_contain_text(f"its recovered VM {vm.name} sends through ps-recovery")
    # A returning replication is failed over, and ends, from its failback only.
    status = page.locator("#item-status")
    expect(status.locator("a.button")).to_have_count(0)
    expect(status.get_by_role("button", name="Disable replication", exact=True)).to_have_count(0)

    # The items list: the returning replication beside the item it brings home.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Replicated items", exact=True).click()
    returning_row = page.locator(f"#item-rows tr:has(a[href='/items/{returning.pk}/'])")
    expect(returning_row.locator("td.direction")).to_have_text("Recovery → primary")
    expect(page.locator(f"#item-rows tr:has(a[href='/items/{item.pk}/']) td.direction")).to_have_text("Primary → recovery")

    # --- Fail over to on-premises, planned, after the recovered VM wrote some more ---------------
    wait_for(lambda: written.bytes >= written_at_reprotect + 128 * 1024, timeout=60,
             message="the recovered VM writing after the reprotect")
    page.locator(f"#item-rows a[href='/items/{item.pk}/']").click()
    page.locator("#item-failback").get_by_role("link", name="Fail over to on-premises", exact=True).click()
    expect(page.locator("h1")).to_have_text("Fail over to on-premises: app-fb")
    expect(page.get_by_label(re.compile("Planned:"))).to_be_checked()
    # A wrong name is refused with the reason (in a tab of its own: the browser reports its 400
    # as a console error, which fails the main tab).
    wrong = page.context.new_page()
    wrong.goto(page.url)
    wrong.get_by_label("Type the VM's name, app-fb, to fail it back").fill("app-f")
    wrong.get_by_role("button", name="Fail over to on-premises", exact=True).click()
    expect(wrong.locator("#failback-form .error")).to_contain_text("That is not the VM's name. Type app-fb exactly.")
    wrong.close()
    assert _in_thread(lambda: Failback.objects.get(item=item).state) == "REPLICATING_BACK"
    page.get_by_label("Type the VM's name, app-fb, to fail it back").fill("app-fb")
    page.get_by_role("button", name="Fail over to on-premises", exact=True).click()
    expect(page.locator("h1")).to_have_text("Fail over to on-premises: app-fb")
    expect(page.locator("#job-target")).to_have_text("app-fb")
    _wait_job(page, expect_text="runs on-premises again")
    committed["stop_recovered_writer"]()

    # Every byte the recovered VM wrote is on-premises: the original VM's disk files equal the
    # recovered VM's disks, which the planned failback shut down.
    onprem = committed["onprem"]
    recovered = _in_thread(lambda: _recovered_shas(vm))
    assert _file_shas(onprem) == recovered, "the on-premises disks differ from the recovered VM's after failback"
    assert committed["recovered_site"].get_vm(vm.vm_id).power_state == "poweredOff"
    assert committed["site"].site.get_vm(item.machine.instance_uuid).power_state == "poweredOn"

    # --- Commit -----------------------------------------------------------------------------------
    page.locator("#job-target").click()
    expect(page.locator("#item-failback .failback-state")).to_have_text("Failed over to on-premises, commit pending")
    _expect_only_button(page, "Commit")
    page.locator("#item-failback").get_by_role("link", name="Commit", exact=True).click()
    expect(page.locator("h1")).to_have_text("Commit failback: app-fb")
    page.get_by_label("app-fb runs on-premises for good: commit the failback").check()
    page.get_by_role("button", name="Commit", exact=True).click()
    _wait_job(page, expect_text="The failback of app-fb is final: it runs on-premises.")

    # --- Re-enable replication --------------------------------------------------------------------
    page.locator("#job-target").click()
    expect(page.locator("#item-failback .failback-state")).to_have_text("Failback committed")
    _expect_only_button(page, "Re-enable replication")
    page.locator("#item-failback").get_by_role("link", name="Re-enable replication", exact=True).click()
    expect(page.locator("h1")).to_have_text("Re-enable replication: app-fb")
    page.get_by_label(re.compile("Replicate app-fb to the recovery site again")).check()
    page.get_by_role("button", name="Re-enable replication", exact=True).click()
    _wait_job(page, expect_text="app-fb is the item's source, as before.")
    page.locator("#job-target").click()
    expect(page.locator("h1")).to_have_text("app-fb")
    expect(page.locator("#protection-state")).to_have_text("Protected")
    expect(page.locator("#item-status dt:text-is('Direction') + dd")).to_have_text("Primary to recovery")
    card = page.locator("#item-failback")
    expect(card).to_contain_text("Last failback: completed: replicating to the recovery site again")
    expect(card.locator("a.button")).to_have_count(0)
    expect(page.locator("#recovered-vm-failover")).to_have_count(0)
    page.goto(f"{base}/items/")
    expect(page.locator("#item-rows td.direction")).to_have_text(["Primary → recovery"])
    page.screenshot(path="/tmp/lifeboat-failback-completed.png", full_page=True)
    page.close()
    assert not problems, "\n".join(problems)

    # Re-enabling read the on-premises disks and wrote none: they still hold the recovered VM's bytes.
    assert _file_shas(onprem) == recovered, "the on-premises disks changed while replication was re-enabled"
    assert not _in_thread(lambda: ProtectedItem.objects.filter(pk=returning.pk).exists())
