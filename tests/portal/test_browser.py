"""The portal in a real Chromium: sign in, walk every page through its links, use the forms.

The live server runs in a thread with its own database connection, so the data is committed
(``live_server`` makes the test transactional). Playwright's sync API keeps an event loop in
this thread, where Django refuses ORM calls; the few writes made while the browser is open
run in a short-lived thread of their own (``_in_thread``).

Any server error, failed asset, browser console error or uncaught page error fails the test,
so a missing htmx (a 404 on its script) or a template that breaks its JavaScript is caught.
"""
from __future__ import annotations

import re
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from core.choices import JobState, JobType
from core.models import Job
from recovery_plans.models import RecoveryPlan, RecoveryPlanGroup
from replication.choices import ProtectionState, RecoveryPointType
from replication.models import RecoveryPoint
from tests.conftest import peer_missing
from tests.factories import (
    DiskFactory,
    MachineFactory,
    PolicyFactory,
    ProcessServerFactory,
    ProtectedItemFactory,
    ReplicaDiskFactory,
    VaultFactory,
)
from vault.choices import Health, Severity
from vault.models import Alert, ReplicationPolicy, VCenter
from vault.services import alert_raise, event_record

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SCREENSHOTS = Path("/tmp")
TIMEOUT_MS = 10_000


def _in_thread(fn):
    """Run an ORM call outside Playwright's event loop; return its result."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc
        finally:
            connection.close()

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.fixture
def site(transactional_db, admin_user):
    vault = VaultFactory(name="prod-east")
    policy = PolicyFactory(vault=vault, name="gold")
    server = ProcessServerFactory(vault=vault, name="ps-east", cache_free_bytes=120 << 30, cache_total_bytes=200 << 30,
                                  pending_upload_bytes=30 << 20, cpu_percent=18.0, memory_percent=41.0)
    vcenter = VCenter.objects.create(vault=vault, name="vc-east", host="vc-east.example.com", username="root",
                                     password_encrypted="x", last_discovery_at=timezone.now() - timedelta(minutes=7))
    items = []
    for n, (health, rpo) in enumerate([(Health.HEALTHY, 95), (Health.WARNING, 1260), (Health.CRITICAL, 5400)]):
        machine = MachineFactory(vault=vault, vcenter=vcenter, source="vcenter", name=f"app-{n + 1:02d}",
                                 host="esx-01.example.com")
        DiskFactory(machine=machine, key=2000, label="Hard disk 1", capacity_bytes=40 << 30)
        DiskFactory(machine=machine, key=2001, label="Hard disk 2", capacity_bytes=200 << 30)
        item = ProtectedItemFactory(
            vault=vault, machine=machine, policy=policy, process_server=server, health=health, rpo_seconds=rpo,
            protection_state=ProtectionState.PROTECTED, last_recovery_point_at=timezone.now() - timedelta(seconds=rpo),
            health_reasons=[] if health == Health.HEALTHY else [f"RPO is {rpo // 60} minutes (threshold 15)"],
        )
        ReplicaDiskFactory(item=item, index=0, source_disk_key=2000, label="Hard disk 1", capacity_bytes=40 << 30)
        ReplicaDiskFactory(item=item, index=1, source_disk_key=2001, label="Hard disk 2", capacity_bytes=200 << 30)
        for k in range(12):
            # A point every 5 minutes, cut 20 seconds after its source time.
            source_time = timezone.now() - timedelta(seconds=rpo + 300 * k)
            point = RecoveryPoint.objects.create(
                item=item, point_id=f"p{k}", seq=k, time=source_time,
                type=RecoveryPointType.APP_CONSISTENT if k % 6 == 5 else RecoveryPointType.CRASH_CONSISTENT,
            )
            RecoveryPoint.objects.filter(pk=point.pk).update(created_at=source_time + timedelta(seconds=20))
        event_record(vault=vault, kind="protected", message=f"{machine.name} is protected", protected_item=item)
        items.append(item)
    MachineFactory(vault=vault, vcenter=vcenter, source="vcenter", name="build-server")
    alert, _ = alert_raise(vault=vault, key=f"rpo:{items[2].pk}", kind="rpo", severity=Severity.CRITICAL,
                           message="RPO of app-03 is 90 minutes, above its threshold of 15", protected_item=items[2])
    now = timezone.now()
    running = Job.objects.create(
        vault=vault, type=JobType.DISCOVERY, state=JobState.RUNNING, target_type="vcenter", target_id=str(vcenter.pk),
        target_name="vc-east", progress=45, started_at=now - timedelta(seconds=40), heartbeat_at=now, created_by=admin_user,
        steps=[{"name": "Connect", "state": "SUCCEEDED", "progress": 100},
               {"name": "Read inventory", "state": "RUNNING", "progress": 35},
               {"name": "Update machines", "state": "PENDING", "progress": 0}],
    )
    Job.objects.create(vault=vault, type=JobType.ENABLE_REPLICATION, state=JobState.SUCCEEDED, target_type="item",
                       target_id=str(items[0].pk), target_name="app-01", progress=100,
                       started_at=now - timedelta(hours=2), ended_at=now - timedelta(hours=1))
    plan = RecoveryPlan.objects.create(vault=vault, name="web-tier", description="Databases first")
    RecoveryPlanGroup.objects.create(plan=plan, order=1, name="Databases").items.add(items[0])
    RecoveryPlanGroup.objects.create(plan=plan, order=2, name="Web").items.add(items[1], items[2])
    return {"vault": vault, "items": items, "alert": alert, "running": running}


@pytest.fixture
def browser_page(live_server):
    if not Path(CHROMIUM).exists():
        peer_missing(f"Chromium is not installed at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)

        def on_response(response):
            if response.status >= 500:
                problems.append(f"HTTP {response.status} from {response.url}")
            elif response.status >= 400 and "/static/" in response.url:
                problems.append(f"HTTP {response.status} for the asset {response.url}")

        def on_request_failed(request):
            # A poll cut short by a navigation is aborted; anything else is a real failure.
            if request.failure != "net::ERR_ABORTED":
                problems.append(f"request failed: {request.url} ({request.failure})")

        page.on("response", on_response)
        page.on("requestfailed", on_request_failed)
        page.on("console", lambda msg: msg.type == "error" and problems.append(f"console error: {msg.text}"))
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        try:
            yield page, problems
        finally:
            browser.close()
    assert not problems, "\n".join(problems)


def _nav(page, problems: list[str], name: str):
    """Follow a link of the main navigation, after checking the page so far went cleanly."""
    assert not problems, "\n".join(problems)
    page.get_by_role("navigation", name="Main").get_by_role("link", name=name, exact=True).click()


def test_portal_in_chromium(live_server, site, browser_page):
    from playwright.sync_api import expect

    page, problems = browser_page
    base = live_server.url

    # Signing in: the portal sends an anonymous visitor to the login page first.
    page.goto(f"{base}/")
    expect(page).to_have_url(re.compile(r"/login/\?next=/$"))
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("p.error")).to_contain_text("didn't match")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("admin-pass-123")
    page.get_by_role("button", name="Sign in").click()

    # Overview: htmx is loaded and the live panel polls.
    expect(page.locator("h1")).to_have_text("prod-east")
    page.wait_for_load_state("load")
    assert not problems, "\n".join(problems)
    page.wait_for_function("() => window.htmx !== undefined && typeof window.htmx.ajax === 'function'")
    live = page.locator("#overview-live")
    expect(live).to_have_attribute("hx-trigger", "every 5s")
    expect(live).to_contain_text("RPO of app-03 is 90 minutes")
    expect(live.locator(".stats")).to_contain_text("Critical")
    page.screenshot(path=str(SCREENSHOTS / "lifeboat-overview.png"), full_page=True)

    # Replicated items, then one item through its link.
    _nav(page, problems, "Replicated items")
    expect(page.locator("h1")).to_have_text("Replicated items")
    expect(page.locator("#item-rows tr")).to_have_count(3)
    expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Replicated items")).to_have_attribute(
        "aria-current", "page"
    )
    page.get_by_role("link", name="app-02").click()
    expect(page.locator("h1")).to_have_text("app-02")
    expect(page.locator("#item-status")).to_contain_text("Protected")
    expect(page.locator("#item-status")).to_contain_text("21 min")
    expect(page.get_by_role("cell", name="Hard disk 2")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "lifeboat-item-detail.png"), full_page=True)

    _nav(page, problems, "Infrastructure")
    expect(page.locator("h1")).to_have_text("Site Recovery infrastructure")
    expect(page.get_by_role("cell", name="ps-east")).to_be_visible()
    expect(page.get_by_role("cell", name="build-server")).to_be_visible()

    # Recovery plans.
    _nav(page, problems, "Recovery plans")
    expect(page.locator("h1")).to_have_text("Recovery plans")
    expect(page.get_by_role("cell", name="web-tier")).to_be_visible()
    expect(page.locator("main")).to_contain_text("Databases (1 item) → Web (2 items)")

    # Policies: create one through the form.
    _nav(page, problems, "Policies")
    expect(page.locator("h1")).to_have_text("Replication policies")
    page.get_by_role("link", name="Create policy").click()
    expect(page.locator("h1")).to_have_text("Create a replication policy")
    page.get_by_label("Name").fill("silver")
    page.get_by_label("Storage tier").select_option("standard")
    page.get_by_label("Rpo threshold minutes").fill("30")
    page.get_by_label("Recovery point retention hours").fill("72")
    page.get_by_label("App consistent frequency hours").fill("6")
    page.get_by_label("Crash consistent frequency seconds").fill("120")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("h1")).to_have_text("Replication policies")
    expect(page.locator("ul.messages")).to_contain_text("Policy silver saved")
    expect(page.get_by_role("cell", name="silver-failback")).to_be_visible()

    # ...and a bad one: the form says why and nothing is saved.
    page.get_by_role("link", name="Create policy").click()
    page.get_by_label("Name").fill("bronze")
    page.get_by_label("Storage tier").select_option("premium")
    page.get_by_label("Recovery point retention hours").fill("48")
    page.get_by_role("button", name="Save").click()
    field = page.locator(".field.has-error")
    expect(field).to_have_count(1)
    expect(field).to_contain_text("Premium storage keeps recovery points for at most 24 hours.")
    _nav(page, problems, "Policies")
    expect(page.get_by_role("cell", name="bronze", exact=True)).to_have_count(0)
    # Editing an existing policy through its link.
    page.get_by_role("link", name="gold", exact=True).click()
    expect(page.locator("h1")).to_have_text("Edit policy gold")

    # Jobs: the running job's page polls until it ends.
    _nav(page, problems, "Jobs")
    expect(page.locator("h1")).to_have_text("Site Recovery jobs")
    page.get_by_role("link", name="Discover vCenter").click()
    progress = page.locator("#job-progress")
    expect(progress.locator("progress").first).to_be_visible()
    expect(progress.locator("progress").first).to_have_attribute("value", "45")
    expect(page.locator("#job-state")).to_have_text("In progress")
    expect(progress).to_have_attribute("hx-trigger", "every 2s")
    _in_thread(lambda: Job.objects.filter(pk=site["running"].pk).update(
        state=JobState.SUCCEEDED, progress=100, ended_at=timezone.now()))
    expect(page.locator("#job-state")).to_have_text("Succeeded")
    expect(page.locator("#job-percent")).to_have_text("100%")
    expect(page.locator("#job-progress[hx-trigger]")).to_have_count(0)  # polling stopped (HTTP 286)

    # Alerts: acknowledging one swaps its row in place (an htmx POST carrying the CSRF token).
    _nav(page, problems, "Alerts")
    expect(page.locator("h1")).to_have_text("Alerts and events")
    row = page.locator(f"#alert-{site['alert'].pk}")
    expect(row).to_contain_text("RPO of app-03 is 90 minutes")
    row.get_by_role("button", name="Acknowledge").click()
    expect(page.locator(f"#alert-{site['alert'].pk} td").last).to_have_text("yes")

    # Vault settings and vault creation, from the vault bar.
    page.get_by_role("link", name="Vault: prod-east").click()
    expect(page.locator("h1")).to_have_text("Vault settings")
    expect(page.get_by_label("Name")).to_have_value("prod-east")
    page.get_by_role("link", name="Create another vault").click()
    expect(page.locator("h1")).to_have_text("Create a Recovery Services vault")

    # The API documentation is served by Lifeboat itself.
    page.get_by_role("link", name="API", exact=True).click()
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Lifeboat API")
    expect(page.locator(".opblock-tag-section").first).to_be_visible()

    page.go_back()
    _nav(page, problems, "Overview")
    expect(page.locator("h1")).to_have_text("prod-east")
    page.wait_for_function("() => window.htmx !== undefined")
    page.close()
    assert not problems, "\n".join(problems)

    acknowledged = _in_thread(lambda: Alert.objects.select_related("acknowledged_by").get(pk=site["alert"].pk))
    assert acknowledged.acknowledged and acknowledged.acknowledged_by.username == "admin"
    assert _in_thread(lambda: list(
        ReplicationPolicy.objects.filter(vault=site["vault"]).order_by("name").values_list("name", flat=True)
    )) == ["gold", "gold-failback", "silver", "silver-failback"]
