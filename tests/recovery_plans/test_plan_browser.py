"""The plan editor in a real Chromium: build a plan by clicking, each edit an HTMX swap of
the editor; a refused edit shows its reason in place. Uses the portal browser test's site
and page (a server error, a failed asset or a page error fails the test)."""
from __future__ import annotations

import re

import pytest

from recovery_plans.models import RecoveryPlan
from tests.portal.test_browser import _in_thread, browser_page, site  # noqa: F401  fixtures

pytestmark = pytest.mark.browser


def test_plan_editor_in_chromium(live_server, site, browser_page):  # noqa: F811
    from playwright.sync_api import expect

    page, problems = browser_page
    page.goto(f"{live_server.url}/plans/")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("admin-pass-123")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name="web-tier").click()
    expect(page.locator("h1")).to_have_text("web-tier")
    page.wait_for_function("() => window.htmx !== undefined")
    # The site's items have no recovery site: the plan says so, item by item.
    expect(page.locator("#plan-status")).to_contain_text("Not ready to fail over")
    expect(page.locator("#plan-status")).to_contain_text("app-01 has no recovery site.")

    # Add a third group and move it before the web servers.
    page.get_by_label("New group (fails over after group 2)").fill("Checks")
    page.get_by_role("button", name="Add group").click()
    expect(page.locator("#group-3 h2")).to_contain_text("Group 3: Checks")
    page.locator("#group-3").get_by_role("button", name="Move up").click()
    expect(page.locator("#group-2 h2")).to_contain_text("Group 2: Checks")

    # A script without a command is refused in place (400), and nothing is added.
    group = page.locator("#group-2")
    group.locator("summary", has_text="Add an action").click()
    group.get_by_label("Name", exact=True).fill("Update DNS")
    group.get_by_role("button", name="Add action").click()
    expect(page.locator("#plan-error")).to_have_text("'Update DNS' in Checks: A script action needs the command to run.")

    group = page.locator("#group-2")
    group.locator("summary", has_text="Add an action").click()
    group.get_by_label("When").select_option("POST")
    group.get_by_label("Name", exact=True).fill("Update DNS")
    group.get_by_label("Command").fill("/opt/dr/dns.sh")
    group.get_by_label("Timeout (s)").fill("90")
    group.get_by_role("button", name="Add action").click()
    expect(page.locator("#plan-error")).to_have_count(0)
    expect(page.locator("#group-2 .plan-actions[data-phase=POST]")).to_contain_text("/opt/dr/dns.sh")
    expect(page.locator("#group-2")).to_contain_text("(timeout 90 s)")

    # Move a web server into the checks group.
    row = page.locator("#group-3 tr", has_text="app-03")
    row.get_by_label("Move app-03 to group").select_option(label="Group 2: Checks")
    row.get_by_role("button", name="Move", exact=True).click()
    expect(page.locator("#group-2 .plan-items")).to_contain_text("app-03")

    groups = _in_thread(lambda: [
        (g.order, g.name, sorted(i.name for i in g.items.all()), [a.script for a in g.actions.all()])
        for g in RecoveryPlan.objects.get(name="web-tier").groups.order_by("order")
    ])
    assert groups == [(1, "Databases", ["app-01"], []), (2, "Checks", ["app-03"], ["/opt/dr/dns.sh"]),
                      (3, "Web", ["app-02"], [])]
    # The browser logs the refused edit's 400 on its console: expected here, and only that.
    problems[:] = [p for p in problems if not re.search(r"status of 400 \(Bad Request\)", p)]
    assert not problems, "\n".join(problems)
