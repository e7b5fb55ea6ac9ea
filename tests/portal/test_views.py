"""The portal through Django's test client: sign-in, every page, forms, HTMX partials, query counts."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from core.choices import JobState, JobType
from core.models import Job
from core.portal import HTMX_STOP_POLLING
from recovery_plans.models import RecoveryPlan, RecoveryPlanAction, RecoveryPlanGroup
from replication.choices import ProtectionState, RecoveryPointType
from replication.models import RecoveryPoint
from tests.conftest import grant_role
from tests.factories import (
    DiskFactory,
    MachineFactory,
    PolicyFactory,
    ProcessServerFactory,
    ProtectedItemFactory,
    ReplicaDiskFactory,
)
from vault.choices import Health, Severity
from vault.models import ReplicationPolicy, Vault, VCenter
from vault.services import alert_raise, event_record

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


def _job(vault, state, *, job_type=JobType.DISCOVERY, progress=0, target_name="vc01", **fields) -> Job:
    now = timezone.now()
    return Job.objects.create(
        vault=vault, type=job_type, state=state, target_type="vcenter", target_id="1", target_name=target_name,
        progress=progress, started_at=None if state == JobState.QUEUED else now - timedelta(minutes=2),
        ended_at=now if state in JobState.TERMINAL else None,
        steps=[{"name": "Connect", "state": "SUCCEEDED", "progress": 100},
               {"name": "Read inventory", "state": "RUNNING", "progress": 40}],
        **fields,
    )


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture
def viewer_client(client, viewer_user, vault):
    grant_role(viewer_user, vault, "READER")
    client.force_login(viewer_user)
    return client


@pytest.fixture
def site(vault, admin_user):
    """A vault with something on every page."""
    policy = PolicyFactory(vault=vault, name="gold")
    server = ProcessServerFactory(vault=vault, name="ps-east", cache_free_bytes=50 << 30, cpu_percent=12.5)
    vcenter = VCenter.objects.create(vault=vault, name="vc-east", host="vc-east.example.com", username="root",
                                     password_encrypted="x")
    machine = MachineFactory(vault=vault, vcenter=vcenter, name="db-01", source="vcenter")
    DiskFactory(machine=machine, label="Hard disk 1", capacity_bytes=20 << 30)
    item = ProtectedItemFactory(vault=vault, machine=machine, policy=policy, process_server=server,
                                health=Health.WARNING, rpo_seconds=1260, health_reasons=["RPO above threshold"])
    ReplicaDiskFactory(item=item, label="Hard disk 1", capacity_bytes=20 << 30)
    RecoveryPoint.objects.create(item=item, point_id="p-1", seq=10, time=timezone.now() - timedelta(minutes=21),
                                 type=RecoveryPointType.APP_CONSISTENT)
    event_record(vault=vault, kind="replication_started", message="Replication of db-01 started", protected_item=item)
    alert, _ = alert_raise(vault=vault, key=f"rpo:{item.pk}", kind="rpo", message="RPO of db-01 is 21 min",
                           severity=Severity.WARNING, protected_item=item)
    running = _job(vault, JobState.RUNNING, progress=40, created_by=admin_user)
    done = _job(vault, JobState.FAILED, job_type=JobType.ENABLE_REPLICATION, target_name="db-01",
                error="The vCenter refused the request.")
    plan = RecoveryPlan.objects.create(vault=vault, name="web-tier")
    group = RecoveryPlanGroup.objects.create(plan=plan, order=1, name="Databases")
    group.items.add(item)
    RecoveryPlanAction.objects.create(group=group, phase="PRE", kind="MANUAL", name="Stop writes", instructions="...")
    return {"vault": vault, "policy": policy, "server": server, "vcenter": vcenter, "machine": machine, "item": item,
            "alert": alert, "running": running, "done": done, "plan": plan}


def _pages(site) -> dict[str, tuple[str, list[str]]]:
    """name -> (url, texts the page must show)."""
    return {
        "overview": (reverse("portal:overview"),
                     [site["vault"].name, "db-01", "RPO of db-01 is 21 min", "ps-east", "Enabling protection"]),
        "items": (reverse("portal:items"), ["db-01", "gold", "ps-east", "Warning"]),
        "item-detail": (reverse("portal:item-detail", args=[site["item"].pk]),
                        ["db-01", "RPO above threshold", "Hard disk 1", "App-consistent", "Replication of db-01 started"]),
        "infrastructure": (reverse("portal:infrastructure"), ["ps-east", "vc-east", "db-01", "20.0\xa0GB"]),
        "policies": (reverse("portal:policies"), ["gold", "gold-failback"]),
        "policy-create": (reverse("portal:policy-create"), ["Create a replication policy", 'name="rpo_threshold_minutes"']),
        "policy-edit": (reverse("portal:policy-edit", args=[site["policy"].pk]), ["Edit policy gold", 'value="gold"']),
        "alerts": (reverse("portal:alerts"), ["RPO of db-01 is 21 min", "Acknowledge"]),
        "jobs": (reverse("portal:jobs"), ["Discover vCenter", "Enable replication", "vc01"]),
        "job-detail": (reverse("portal:job-detail", args=[site["running"].pk]), ["Read inventory", "<progress", "40%"]),
        "plans": (reverse("portal:plans"), ["web-tier", "Databases (1 item)"]),
        "vault-settings": (reverse("portal:vault-settings"), ["Vault settings", site["vault"].name]),
        "vault-create": (reverse("portal:vault-create"), ["Create a Recovery Services vault", 'name="passphrase"']),
    }


def test_every_page_needs_sign_in(client, site):
    for name, (url, _) in _pages(site).items():
        response = client.get(url)
        assert response.status_code == 302, name
        assert response["Location"] == f"{reverse('login')}?next={url}", name


def test_every_page_renders_for_an_admin(admin_client, site):
    for name, (url, texts) in _pages(site).items():
        response = admin_client.get(url)
        assert response.status_code == 200, name
        html = response.content.decode()
        assert html.lstrip().startswith("<!doctype html>"), name
        assert "vendor/htmx/htmx.min.js" in html, name
        for text in texts:
            assert text in html, f"{name}: {text!r} missing"


def test_first_visit_without_a_vault_leads_to_creating_one(admin_client):
    response = admin_client.get(reverse("portal:overview"))
    assert response.status_code == 302 and response["Location"] == reverse("portal:vault-create")
    response = admin_client.post(reverse("portal:vault-create"), {
        "name": "prod", "passphrase": "a long enough registration passphrase", "off_hours_start": "22:00",
        "off_hours_end": "06:00", "off_hours_time_zone": "Europe/Paris", "alert_emails": "ops@example.com",
    })
    assert response.status_code == 302 and response["Location"] == reverse("portal:overview")
    vault = Vault.objects.get(name="prod")
    assert vault.alert_emails == ["ops@example.com"]
    assert admin_client.get(reverse("portal:overview")).context["vault"] == vault


def test_vault_form_shows_errors(admin_client, vault):
    response = admin_client.post(reverse("portal:vault-settings"), {
        "name": vault.name, "off_hours_start": "22:00", "off_hours_end": "06:00",
        "off_hours_time_zone": "Atlantis/Capital", "alert_emails": "ops@example.com, nonsense",
    })
    assert response.status_code == 200
    html = response.content.decode()
    assert "&#x27;nonsense&#x27; is not a valid e-mail address." in html
    vault.refresh_from_db()
    assert vault.alert_emails == [] and vault.off_hours_time_zone == "UTC"


# --- policies --------------------------------------------------------------------------


def _policy_form(**overrides) -> dict:
    data = {"name": "silver", "storage_tier": "standard", "rpo_threshold_minutes": 30,
            "recovery_point_retention_hours": 48, "app_consistent_frequency_hours": 4,
            "crash_consistent_frequency_seconds": 300}
    data.update(overrides)
    return data


def test_create_policy_through_the_form(admin_client, vault):
    response = admin_client.post(reverse("portal:policy-create"), _policy_form())
    assert response.status_code == 302 and response["Location"] == reverse("portal:policies")
    policy = ReplicationPolicy.objects.get(vault=vault, name="silver")
    assert policy.failback_policy.name == "silver-failback"
    assert policy.failback_policy.recovery_point_retention_hours == 48
    listing = admin_client.get(reverse("portal:policies")).content.decode()
    assert "Policy silver saved" in listing and "silver-failback" in listing


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"storage_tier": "premium", "recovery_point_retention_hours": 48},
         "Premium storage keeps recovery points for at most 24 hours."),
        ({"app_consistent_frequency_hours": 13}, "Ensure this value is less than or equal to 12."),
        ({"crash_consistent_frequency_seconds": 2}, "Ensure this value is greater than or equal to 5."),
        ({"rpo_threshold_minutes": 0}, "Ensure this value is greater than or equal to 1."),
        ({"name": ""}, "This field is required."),
        ({"name": "gold"}, "already exists"),
    ],
)
def test_policy_form_shows_errors_and_changes_nothing(admin_client, vault, overrides, message):
    PolicyFactory(vault=vault, name="gold")
    before = list(ReplicationPolicy.objects.order_by("pk").values())
    response = admin_client.post(reverse("portal:policy-create"), _policy_form(**overrides))
    assert response.status_code == 200
    html = response.content.decode()
    assert message in html
    assert 'class="error"' in html
    assert list(ReplicationPolicy.objects.order_by("pk").values()) == before


def test_edit_policy_with_bad_input_changes_nothing(admin_client, vault):
    policy = PolicyFactory(vault=vault, name="gold", recovery_point_retention_hours=48)
    url = reverse("portal:policy-edit", args=[policy.pk])
    response = admin_client.post(url, _policy_form(name="gold", storage_tier="premium"))
    assert response.status_code == 200
    assert "at most 24 hours" in response.content.decode()
    policy.refresh_from_db()
    assert policy.storage_tier == "standard"
    response = admin_client.post(url, _policy_form(name="gold", rpo_threshold_minutes=45))
    assert response.status_code == 302
    policy.refresh_from_db()
    assert policy.rpo_threshold_minutes == 45
    assert policy.failback_policy.rpo_threshold_minutes == 45
    # The failback policy has no edit page of its own.
    assert admin_client.get(reverse("portal:policy-edit", args=[policy.failback_policy_id])).status_code == 404


def test_viewer_cannot_create_or_edit_a_policy(viewer_client, vault):
    policy = PolicyFactory(vault=vault, name="gold")
    page = viewer_client.get(reverse("portal:policies"))
    assert page.status_code == 200 and "Create policy" not in page.content.decode()
    assert viewer_client.post(reverse("portal:policy-create"), _policy_form()).status_code == 403
    assert viewer_client.post(reverse("portal:policy-edit", args=[policy.pk]), _policy_form(name="gold")).status_code == 403
    assert not ReplicationPolicy.objects.filter(name="silver").exists()
    policy.refresh_from_db()
    assert policy.rpo_threshold_minutes == 15


# --- HTMX partials ---------------------------------------------------------------------


def test_job_detail_partial_polls_until_the_job_ends(admin_client, site):
    running = admin_client.get(reverse("portal:job-detail", args=[site["running"].pk]), **HTMX)
    assert running.status_code == 200
    html = running.content.decode()
    assert html.lstrip().startswith('<section class="card" id="job-progress"')
    assert "<html" not in html and "Started by" not in html
    assert 'hx-trigger="every 2s"' in html and "40%" in html

    finished = admin_client.get(reverse("portal:job-detail", args=[site["done"].pk]), **HTMX)
    assert finished.status_code == HTMX_STOP_POLLING == 286
    html = finished.content.decode()
    assert 'id="job-progress"' in html and "hx-trigger" not in html and "<html" not in html
    assert "The vCenter refused the request." in html

    # The job ends between two polls: the next poll stops polling.
    Job.objects.filter(pk=site["running"].pk).update(state=JobState.SUCCEEDED, progress=100, ended_at=timezone.now())
    assert admin_client.get(reverse("portal:job-detail", args=[site["running"].pk]), **HTMX).status_code == 286
    # A plain (non-HTMX) request for a finished job is an ordinary page.
    assert admin_client.get(reverse("portal:job-detail", args=[site["done"].pk])).status_code == 200


def test_overview_htmx_returns_the_live_partial(admin_client, site):
    response = admin_client.get(reverse("portal:overview"), **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="overview-live"')
    assert "<html" not in html and "<h1>" not in html
    assert "RPO of db-01 is 21 min" in html and "ps-east" in html


def test_item_list_filter_partial(admin_client, site):
    ProtectedItemFactory(vault=site["vault"], name="web-01", machine__name="web-01", health=Health.HEALTHY)
    response = admin_client.get(reverse("portal:items"), {"health": "WARNING"}, **HTMX)
    html = response.content.decode()
    assert response.status_code == 200 and html.lstrip().startswith('<tbody id="item-rows">')
    assert "db-01" in html and "web-01" not in html


# --- alerts ----------------------------------------------------------------------------


def test_acknowledge_alert_through_the_portal(admin_client, admin_user, site):
    alert = site["alert"]
    response = admin_client.post(reverse("portal:alert-acknowledge", args=[alert.pk]), **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith(f'<tr id="alert-{alert.pk}">')
    assert "Acknowledge</button>" not in html and "<td>yes</td>" in html
    alert.refresh_from_db()
    assert alert.acknowledged and alert.acknowledged_by == admin_user

    other, _ = alert_raise(vault=site["vault"], key="ps:1", kind="ps_heartbeat", message="ps-east is silent")
    response = admin_client.post(reverse("portal:alert-acknowledge", args=[other.pk]))
    assert response.status_code == 302 and response["Location"] == reverse("portal:alerts")
    other.refresh_from_db()
    assert other.acknowledged
    assert admin_client.get(reverse("portal:alert-acknowledge", args=[other.pk])).status_code == 405


def test_viewer_cannot_acknowledge_an_alert(viewer_client, site):
    page = viewer_client.get(reverse("portal:alerts")).content.decode()
    assert "RPO of db-01 is 21 min" in page and "Acknowledge</button>" not in page
    assert viewer_client.post(reverse("portal:alert-acknowledge", args=[site["alert"].pk])).status_code == 403
    site["alert"].refresh_from_db()
    assert not site["alert"].acknowledged


def test_viewer_cannot_cancel_a_job(viewer_client, site):
    response = viewer_client.post(reverse("portal:job-cancel", args=[site["running"].pk]))
    assert response.status_code == 403 and "Reader" in response.content.decode()
    site["running"].refresh_from_db()
    assert site["running"].state == JobState.RUNNING


def test_admin_cancels_a_running_job(admin_client, site):
    response = admin_client.post(reverse("portal:job-cancel", args=[site["running"].pk]), follow=True)
    assert "Cancellation requested." in response.content.decode()
    site["running"].refresh_from_db()
    assert site["running"].state == JobState.CANCELLING
    response = admin_client.post(reverse("portal:job-cancel", args=[site["done"].pk]), follow=True)
    assert "cannot be cancelled" in response.content.decode()


# --- query counts ----------------------------------------------------------------------


def _queries(client, url) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries)


def _grow_items(vault, server, n: int) -> None:
    for i in range(n):
        policy = PolicyFactory(vault=vault)
        item = ProtectedItemFactory(vault=vault, policy=policy, process_server=server, rpo_seconds=60 + i,
                                    protection_state=ProtectionState.PROTECTED)
        DiskFactory(machine=item.machine)
        alert_raise(vault=vault, key=f"rpo:{item.pk}", kind="rpo", message=f"RPO of {item.name}", protected_item=item)
        _job(vault, JobState.RUNNING if i % 2 else JobState.SUCCEEDED, target_name=item.name)
        MachineFactory(vault=vault)  # discovered, not protected


@pytest.mark.parametrize("page", ["portal:items", "portal:jobs", "portal:infrastructure", "portal:overview", "portal:alerts"])
def test_list_pages_use_a_fixed_number_of_queries(admin_client, vault, page):
    server = ProcessServerFactory(vault=vault)
    url = reverse(page)
    _grow_items(vault, server, 5)
    admin_client.get(url)  # the first visit stores the vault in the session
    few = _queries(admin_client, url)
    _grow_items(vault, server, 55)
    many = _queries(admin_client, url)
    assert many == few, f"{page}: {few} queries with 5 rows, {many} with 60"
