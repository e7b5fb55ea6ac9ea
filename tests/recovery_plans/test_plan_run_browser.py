"""A plan's run panel in a real Chromium, on real parts (the VM, agent, process server, worker
and recovery site of ``tests/portal/test_recovery_browser.py``): an admin drills a plan with a
script and a manual action, sees it pause with the instructions and a Resume button, resumes
it, reads the script's output and cleans the drill up, by clicking."""
from __future__ import annotations

import pytest

from recovery_plans.run_models import RecoveryPlanRun
from replication.choices import TestFailoverState as T
from replication.models import ProtectedItem
from tests.portal.test_browser import _in_thread, browser_page  # noqa: F401 - browser_page is a fixture
from tests.portal.test_recovery_browser import JOB_TIMEOUT_MS, protected  # noqa: F401 - protected is a fixture

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]


def test_plan_drill_pauses_resumes_shows_the_script_and_cleans_up(live_server, protected, browser_page):  # noqa: F811
    from playwright.sync_api import expect

    from recovery_plans import services

    item = protected["item"]
    # ORM calls run outside Playwright's event loop (the browser is open already).
    plan = _in_thread(lambda: services.recovery_plan_create(vault=protected["site"].vault, name="drill-plan", groups=[
        {"name": "App", "items": [item], "actions": [
            {"phase": "POST", "kind": "SCRIPT", "name": "Say hello", "script": "echo hello from the plan; echo careful >&2",
             "timeout_seconds": 60},
            {"phase": "POST", "kind": "MANUAL", "name": "Check the app", "instructions": "Log in to app-br and look."},
        ]},
    ]))
    page, problems = browser_page
    page.goto(f"{live_server.url}/plans/{plan.pk}/")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("admin-pass-123")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("h1")).to_have_text("drill-plan")

    panel = page.locator("#plan-run")
    panel.get_by_label("Recovery point for test failover").select_option("latest_processed")
    panel.get_by_role("button", name="Test failover").click()
    # The panel refreshes itself: the VM comes up, the script runs, the plan waits for the admin.
    waiting = page.locator("#plan-run-waiting")
    expect(waiting).to_contain_text("Log in to app-br and look.", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#plan-run-state")).to_have_attribute("data-state", "WAITING_FOR_ACTION")
    expect(page.locator("#plan-status [data-state]")).to_have_attribute("data-state", "TEST_FAILOVER_IN_PROGRESS", timeout=15_000)
    # Only items are listed under an item stage (an action's stage has none).
    expect(page.locator(".plan-run-stage[data-kind=action] .plan-run-items")).to_have_count(0)
    page.locator("summary", has_text="Script output: exit code 0").click()
    expect(page.locator(".script-output pre.stdout")).to_have_text("hello from the plan\n")
    expect(page.locator(".script-output pre.stderr")).to_have_text("careful\n")
    page.screenshot(path="/tmp/lifeboat-plan-drill-waiting.png", full_page=True)

    waiting.get_by_role("button", name="Resume").click()
    expect(page.locator("#plan-run-waiting")).to_have_count(0)  # at once: the run goes on, no second Resume
    expect(page.locator("#plan-run-state")).to_have_attribute("data-state", "SUCCEEDED", timeout=JOB_TIMEOUT_MS)
    expect(page.locator(".plan-run-stage[data-kind=action]", has_text="Check the app")).to_contain_text("Done; resumed by admin.")
    item_state = _in_thread(lambda: ProtectedItem.objects.get(pk=item.pk).test_failover_state)
    assert item_state == T.SUCCEEDED

    panel.get_by_label("Notes on the drill").fill("the app answered")
    panel.get_by_role("button", name="Cleanup test failover").click()
    expect(page.locator("#plan-run h3").first).to_contain_text("Cleanup test failover")
    expect(page.locator("#plan-run-state")).to_have_attribute("data-state", "SUCCEEDED", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#plan-status [data-state]")).to_have_attribute("data-state", "READY", timeout=15_000)
    runs = _in_thread(lambda: [(r.operation, r.state) for r in RecoveryPlanRun.objects.filter(plan=plan).order_by("created_at")])
    assert runs == [("testFailover", "SUCCEEDED"), ("testFailoverCleanup", "SUCCEEDED")]
    assert _in_thread(lambda: ProtectedItem.objects.get(pk=item.pk).test_failover_state) == T.NONE
    assert not problems, "\n".join(problems)
