"""The REST API scripted the way an admin would: vaults, policies, vCenters, jobs, plans, alerts.

Every error is ``{"error": {"code", "message", ...}}`` JSON; list endpoints run a fixed number
of queries whatever the number of rows.
"""
from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest

from tests.conftest import grant_role
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from core.choices import JobState, JobType
from core.models import Job
from recovery_plans.models import RecoveryPlan
from replication.choices import ProtectionState
from replication.models import ProtectedItem
from tests.factories import (
    DiskFactory,
    MachineFactory,
    PolicyFactory,
    ProcessServerFactory,
    ProtectedItemFactory,
    ReplicaDiskFactory,
    VaultFactory,
)
from vault.choices import AlertState, Severity
from vault.models import Alert, ReplicationPolicy, Vault, VCenter
from vault.services import alert_raise, vcenter_password

pytestmark = pytest.mark.django_db

API = "/api/v1"
PASSPHRASE = "a long enough registration passphrase"
VCENTER_PASSWORD = "s3cret-vcenter-Pa55word"


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The response is a JSON error in Lifeboat's format with ``status``; returns its body."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    assert b"<html" not in response.content.lower()
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture
def viewer_api(viewer_user, vault):
    grant_role(viewer_user, vault, "READER")
    client = APIClient()
    client.force_authenticate(viewer_user)
    return client


def _policy_body(vault, **overrides) -> dict:
    body = {
        "vault": vault.pk,
        "name": "gold",
        "storage_tier": "standard",
        "rpo_threshold_minutes": 30,
        "recovery_point_retention_hours": 48,
        "app_consistent_frequency_hours": 2,
        "crash_consistent_frequency_seconds": 60,
    }
    body.update(overrides)
    return body


# --- vaults ----------------------------------------------------------------------------


def test_create_vault_returns_it_without_the_passphrase(api):
    response = api.post(
        f"{API}/vaults/",
        {
            "name": "prod",
            "passphrase": PASSPHRASE,
            "description": "Production site",
            "off_hours_time_zone": "Europe/Paris",
            "alert_emails": ["ops@example.com", "dr@example.com"],
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert "passphrase" not in body and "passphrase_hash" not in body
    assert PASSPHRASE not in response.content.decode()
    assert body["name"] == "prod"
    assert body["off_hours_time_zone"] == "Europe/Paris"
    assert body["alert_emails"] == ["ops@example.com", "dr@example.com"]
    vault = Vault.objects.get(pk=body["id"])
    assert vault.check_passphrase(PASSPHRASE)
    assert not vault.check_passphrase("another passphrase of some length")
    # The configuration server comes with the vault.
    assert vault.configuration_servers.count() == 1
    detail = api.get(f"{API}/vaults/{vault.pk}/")
    assert "passphrase" not in detail.json()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"passphrase": "too short"}, "passphrase"),
        ({"passphrase": None}, "passphrase"),
        ({"off_hours_time_zone": "Mars/Olympus_Mons"}, "off_hours_time_zone"),
        ({"alert_emails": ["ops@example.com", "not an address"]}, "alert_emails"),
    ],
    ids=["short-passphrase", "missing-passphrase", "bad-time-zone", "bad-email"],
)
def test_create_vault_rejects_bad_input(api, changes, field):
    body = {"name": "prod", "passphrase": PASSPHRASE, **changes}
    body = {k: v for k, v in body.items() if v is not None}
    error = assert_error(api.post(f"{API}/vaults/", body, format="json"), 400, "invalid")
    assert field in error["fields"], error
    assert not Vault.objects.filter(name="prod").exists()


def test_update_vault_and_its_passphrase(api, vault):
    url = f"{API}/vaults/{vault.pk}/"
    response = api.patch(url, {"description": "DR for site A", "alert_emails": ["a@example.com"]}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["description"] == "DR for site A"
    vault.refresh_from_db()
    assert vault.alert_emails == ["a@example.com"]
    # A new passphrase replaces the old one; a short one is refused and changes nothing.
    assert api.patch(url, {"passphrase": "a brand new passphrase 2026"}, format="json").status_code == 200
    assert_error(api.patch(url, {"passphrase": "short"}, format="json"), 400)
    vault.refresh_from_db()
    assert vault.check_passphrase("a brand new passphrase 2026")
    assert_error(api.patch(url, {"off_hours_time_zone": "Nowhere/Nothing"}, format="json"), 400)


def test_list_vaults_is_paginated(api):
    for n in range(5):
        VaultFactory(name=f"vault-{n}")
    first = api.get(f"{API}/vaults/", {"page_size": 2})
    assert first.status_code == 200
    body = first.json()
    assert body["count"] == 5
    assert [v["name"] for v in body["results"]] == ["vault-0", "vault-1"]
    assert body["previous"] is None and body["next"]
    last = api.get(f"{API}/vaults/", {"page_size": 2, "page": 3}).json()
    assert [v["name"] for v in last["results"]] == ["vault-4"]
    assert last["next"] is None
    assert_error(api.get(f"{API}/vaults/", {"page": 9}), 404)


# --- policies --------------------------------------------------------------------------


def test_create_policy_brings_its_failback_policy(api, vault):
    response = api.post(f"{API}/replicationPolicies/", _policy_body(vault), format="json")
    assert response.status_code == 201, response.content
    policy = response.json()
    assert policy["is_failback"] is False and policy["failback_policy"]
    failback = api.get(f"{API}/replicationPolicies/{policy['failback_policy']}/").json()
    assert failback["is_failback"] is True
    assert failback["name"] == "gold-failback"
    for field in ("storage_tier", "rpo_threshold_minutes", "recovery_point_retention_hours",
                  "app_consistent_frequency_hours", "crash_consistent_frequency_seconds"):
        assert failback[field] == policy[field], field
    listed = api.get(f"{API}/replicationPolicies/", {"vault": vault.pk}).json()
    assert sorted(p["name"] for p in listed["results"]) == ["gold", "gold-failback"]


def test_retention_limit_depends_on_storage_tier(api, vault):
    error = assert_error(
        api.post(
            f"{API}/replicationPolicies/",
            _policy_body(vault, storage_tier="premium", recovery_point_retention_hours=25),
            format="json",
        ),
        400,
        "invalid",
    )
    assert "recovery_point_retention_hours" in error["fields"]
    assert "at most 24 hours" in error["message"]
    assert "Premium" in error["message"]
    assert not ReplicationPolicy.objects.filter(vault=vault).exists()
    ok = api.post(f"{API}/replicationPolicies/", _policy_body(vault, recovery_point_retention_hours=72), format="json")
    assert ok.status_code == 201, ok.content
    error = assert_error(
        api.post(f"{API}/replicationPolicies/", _policy_body(vault, name="silver", recovery_point_retention_hours=73), format="json"),
        400,
    )
    assert "72" in error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("app_consistent_frequency_hours", 13),
        ("crash_consistent_frequency_seconds", 4),
        ("rpo_threshold_minutes", 0),
        ("storage_tier", "archive"),
    ],
)
def test_create_policy_rejects_out_of_range_settings(api, vault, field, value):
    error = assert_error(
        api.post(f"{API}/replicationPolicies/", _policy_body(vault, **{field: value}), format="json"), 400, "invalid"
    )
    assert field in error["fields"], error
    assert error["message"].startswith(field)
    assert not ReplicationPolicy.objects.filter(vault=vault).exists()


def test_app_consistent_snapshots_can_be_turned_off(api, vault):
    response = api.post(f"{API}/replicationPolicies/", _policy_body(vault, app_consistent_frequency_hours=0), format="json")
    assert response.status_code == 201, response.content


def test_duplicate_policy_name_is_a_conflict(api, vault):
    assert api.post(f"{API}/replicationPolicies/", _policy_body(vault), format="json").status_code == 201
    error = assert_error(api.post(f"{API}/replicationPolicies/", _policy_body(vault), format="json"), 409, "conflict")
    assert "gold" in error["message"]
    assert ReplicationPolicy.objects.filter(vault=vault).count() == 2
    # The same name in another vault is fine.
    other = VaultFactory()
    assert api.post(f"{API}/replicationPolicies/", _policy_body(other), format="json").status_code == 201


def test_edit_policy_and_its_failback_policy_follows(api, vault):
    policy = PolicyFactory(vault=vault, name="gold")
    url = f"{API}/replicationPolicies/{policy.pk}/"
    response = api.patch(
        url,
        {"name": "platinum", "rpo_threshold_minutes": 5, "recovery_point_retention_hours": 12, "storage_tier": "premium"},
        format="json",
    )
    assert response.status_code == 200, response.content
    failback = ReplicationPolicy.objects.get(pk=policy.failback_policy_id)
    assert failback.name == "platinum-failback"
    assert (failback.storage_tier, failback.rpo_threshold_minutes, failback.recovery_point_retention_hours) == ("premium", 5, 12)
    # Premium with 72 h of retention is refused on edit too, and nothing changes.
    error = assert_error(api.patch(url, {"recovery_point_retention_hours": 72}, format="json"), 400)
    assert "at most 24 hours" in error["message"]
    policy.refresh_from_db()
    assert policy.recovery_point_retention_hours == 12
    # Renaming onto another policy's name is a conflict.
    PolicyFactory(vault=vault, name="bronze")
    assert_error(api.patch(url, {"name": "bronze"}, format="json"), 409, "conflict")
    # A failback policy is not edited on its own.
    assert_error(api.patch(f"{API}/replicationPolicies/{failback.pk}/", {"rpo_threshold_minutes": 9}, format="json"), 400)
    failback.refresh_from_db()
    assert failback.rpo_threshold_minutes == 5


def test_delete_policy(api, vault):
    unused = PolicyFactory(vault=vault, name="unused")
    used = ProtectedItemFactory(vault=vault).policy
    error = assert_error(api.delete(f"{API}/replicationPolicies/{used.pk}/"), 409, "conflict")
    assert "protects items" in error["message"]
    assert ReplicationPolicy.objects.filter(pk=used.pk).exists()
    assert_error(api.delete(f"{API}/replicationPolicies/{unused.failback_policy_id}/"), 400)
    assert api.delete(f"{API}/replicationPolicies/{unused.pk}/").status_code == 204
    assert not ReplicationPolicy.objects.filter(pk__in=[unused.pk, unused.failback_policy_id]).exists()


# --- vCenters --------------------------------------------------------------------------


def test_vcenter_password_is_write_only(api, vault):
    response = api.post(
        f"{API}/replicationvCenters/",
        {"vault": vault.pk, "name": "vc01", "host": "vc01.example.com", "username": "administrator@vsphere.local",
         "password": VCENTER_PASSWORD},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert "password" not in response.json()
    vcenter = VCenter.objects.get(pk=response.json()["id"])
    assert VCENTER_PASSWORD not in vcenter.password_encrypted
    assert vcenter_password(vcenter=vcenter) == VCENTER_PASSWORD
    for url in (f"{API}/replicationvCenters/", f"{API}/replicationvCenters/{vcenter.pk}/"):
        read = api.get(url)
        assert read.status_code == 200
        assert VCENTER_PASSWORD not in read.content.decode()
        assert '"password' not in read.content.decode()
    # Changing the user keeps the password; a new password replaces it, and is not echoed.
    changed = api.patch(f"{API}/replicationvCenters/{vcenter.pk}/", {"username": "svc-lifeboat"}, format="json")
    assert changed.status_code == 200 and "password" not in changed.json()
    assert vcenter_password(vcenter=VCenter.objects.get(pk=vcenter.pk)) == VCENTER_PASSWORD
    changed = api.patch(f"{API}/replicationvCenters/{vcenter.pk}/", {"password": "rotated-Pa55"}, format="json")
    assert "rotated-Pa55" not in changed.content.decode()
    assert vcenter_password(vcenter=VCenter.objects.get(pk=vcenter.pk)) == "rotated-Pa55"


def test_vcenter_needs_a_password(api, vault):
    error = assert_error(
        api.post(f"{API}/replicationvCenters/", {"vault": vault.pk, "name": "vc01", "host": "vc01", "username": "root"}, format="json"),
        400,
    )
    assert "password" in error["fields"]


def test_discover_vcenter_answers_202_with_the_job(api, vault):
    vcenter = VCenter.objects.create(vault=vault, name="vc01", host="vc01", username="root", password_encrypted="x")
    response = api.post(f"{API}/replicationvCenters/{vcenter.pk}/discover/")
    assert response.status_code == 202, response.content
    job = response.json()
    assert job["type"] == JobType.DISCOVERY and job["state"] == JobState.QUEUED
    assert response["Location"].endswith(f"{API}/replicationJobs/{job['id']}/")
    assert api.get(response["Location"]).json()["id"] == job["id"]
    # A second discovery while the first is queued is refused.
    error = assert_error(api.post(f"{API}/replicationvCenters/{vcenter.pk}/discover/"), 409, "already_running")
    assert error["job"] == job["id"]


# --- errors, permissions, authentication -----------------------------------------------


def test_errors_are_json_never_html(admin_user, vault):
    client = APIClient()
    client.force_authenticate(admin_user)
    # Scripts often send no Accept header or */*; neither may get an HTML page back.
    for accept in ({}, {"HTTP_ACCEPT": "*/*"}, {"HTTP_ACCEPT": "application/json"}):
        assert_error(client.post(f"{API}/vaults/", {"name": ""}, format="json", **accept), 400, "invalid")
        assert_error(client.get(f"{API}/vaults/999999/", **accept), 404, "not_found")
        assert_error(client.get(f"{API}/replicationJobs/not-a-uuid/", **accept), 404)
        assert_error(client.delete(f"{API}/replicationJobs/00000000-0000-0000-0000-000000000000/", **accept), 405)
        assert_error(client.post(f"{API}/recoveryPoints/", {}, format="json", **accept), 405)
        assert_error(client.put(f"{API}/replicationJobs/00000000-0000-0000-0000-000000000000/", {}, **accept), 405)
    assert_error(client.post(f"{API}/vaults/", "{not json", content_type="application/json"), 400)
    PolicyFactory(vault=vault, name="gold")
    assert_error(client.post(f"{API}/replicationPolicies/", _policy_body(vault), format="json"), 409)


def test_unauthenticated_requests_get_a_json_error(vault):
    client = APIClient()
    for response in (client.get(f"{API}/vaults/"), client.post(f"{API}/vaults/", {}, format="json"),
                     client.get(f"{API}/replicationJobs/")):
        assert response.status_code in (401, 403)
        error = assert_error(response, response.status_code, "not_authenticated")
        assert "credentials" in error["message"].lower()


def test_viewer_can_read_but_not_change(viewer_api, viewer_user, vault):
    policy = PolicyFactory(vault=vault, name="gold")
    alert, _ = alert_raise(vault=vault, key="test:1", kind="test", message="Disk full")
    assert viewer_api.get(f"{API}/vaults/").status_code == 200
    assert viewer_api.get(f"{API}/replicationPolicies/{policy.pk}/").status_code == 200
    assert viewer_api.get(f"{API}/replicationAlerts/").status_code == 200
    writes = [
        viewer_api.post(f"{API}/vaults/", {"name": "x", "passphrase": PASSPHRASE}, format="json"),
        viewer_api.patch(f"{API}/vaults/{vault.pk}/", {"description": "x"}, format="json"),
        viewer_api.post(f"{API}/replicationPolicies/", _policy_body(vault, name="silver"), format="json"),
        viewer_api.delete(f"{API}/replicationPolicies/{policy.pk}/"),
        viewer_api.post(f"{API}/replicationAlerts/{alert.pk}/acknowledge/"),
    ]
    for response in writes:
        error = assert_error(response, 403, "permission_denied")
        assert "Reader" in error["message"] or "superuser" in error["message"], error
    assert not Vault.objects.filter(name="x").exists()
    assert ReplicationPolicy.objects.filter(pk=policy.pk).exists()
    alert.refresh_from_db()
    assert not alert.acknowledged


def test_token_authentication(admin_user, viewer_user):
    token = Token.objects.create(user=admin_user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    assert client.get(f"{API}/vaults/").status_code == 200
    created = client.post(f"{API}/vaults/", {"name": "scripted", "passphrase": PASSPHRASE}, format="json")
    assert created.status_code == 201, created.content
    # A viewer's token reads but cannot write.
    viewer = APIClient()
    viewer.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=viewer_user).key}")
    assert viewer.get(f"{API}/vaults/").status_code == 200
    assert_error(viewer.post(f"{API}/vaults/", {"name": "v", "passphrase": PASSPHRASE}, format="json"), 403)
    # A wrong token is refused with a JSON error.
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token 0123456789abcdef0123456789abcdef01234567")
    response = bad.get(f"{API}/vaults/")
    assert_error(response, response.status_code, "authentication_failed")
    assert response.status_code in (401, 403)


# --- OpenAPI -----------------------------------------------------------------------------


@pytest.fixture
def openapi(api) -> dict:
    response = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return json.loads(response.content)


def test_openapi_schema_is_valid_and_covers_every_resource(openapi):
    from drf_spectacular.validation import validate_schema

    validate_schema(openapi)
    paths = openapi["paths"]
    for resource in (
        "vaults", "replicationvCenters", "replicationProtectableItems", "replicationPolicies", "processServers",
        "replicationProtectedItems", "recoveryPoints", "replicationRecoveryPlans", "replicationJobs",
        "replicationEvents", "replicationAlerts",
    ):
        assert f"/api/v1/{resource}/" in paths, resource
        assert any(re.fullmatch(rf"/api/v1/{resource}/\{{\w+\}}/", p) for p in paths), resource
    assert "post" in paths["/api/v1/replicationvCenters/{id}/discover/"]
    assert "post" in paths["/api/v1/replicationJobs/{id}/cancel/"]
    assert "post" in paths["/api/v1/replicationAlerts/{id}/acknowledge/"]
    assert "202" in paths["/api/v1/replicationvCenters/{id}/discover/"]["post"]["responses"]
    # Every operation accepts token authentication.
    assert "tokenAuth" in openapi["components"]["securitySchemes"]


def test_openapi_never_returns_secrets(openapi):
    schemas = openapi["components"]["schemas"]
    assert "password" not in schemas["VCenter"]["properties"]
    assert "passphrase" not in schemas["Vault"]["properties"]
    # ...but they can be written.
    assert schemas["VCenterRequest"]["properties"]["password"]["writeOnly"] is True
    assert "passphrase" in schemas["VaultRequest"]["properties"]


def test_api_docs_use_no_cdn(api):
    response = api.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    for cdn in ("cdn.", "unpkg", "jsdelivr"):
        assert cdn not in html, cdn
    # The Swagger UI assets it names are served by Lifeboat itself.
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        assert api.get(asset).status_code == 200, asset


# --- jobs ------------------------------------------------------------------------------


def _job(vault, state=JobState.SUCCEEDED, job_type=JobType.DISCOVERY, **fields) -> Job:
    now = timezone.now()
    ended = now if state in JobState.TERMINAL else None
    started = None if state == JobState.QUEUED else now - timedelta(minutes=1)
    fields = {"target_type": "vcenter", "target_id": "1", "target_name": "vc01", **fields}
    return Job.objects.create(vault=vault, type=job_type, state=state, started_at=started, ended_at=ended, **fields)


def test_jobs_list_filter_and_cancel(api, vault, admin_user):
    other_vault = VaultFactory()
    enabling = ProtectedItemFactory(vault=vault, protection_state=ProtectionState.ENABLING)
    resyncing = ProtectedItemFactory(vault=vault, protection_state=ProtectionState.RESYNCING)
    done = _job(vault, JobState.SUCCEEDED, created_by=admin_user)
    running = _job(vault, JobState.RUNNING, job_type=JobType.RESYNC, target_type="item", target_id=str(resyncing.pk),
                   target_name=resyncing.name)
    queued = _job(vault, JobState.QUEUED, job_type=JobType.ENABLE_REPLICATION, target_type="item",
                  target_id=str(enabling.pk), target_name=enabling.name)
    _job(other_vault, JobState.FAILED)

    listed = api.get(f"{API}/replicationJobs/", {"vault": vault.pk}).json()
    assert listed["count"] == 3
    assert {j["id"] for j in listed["results"]} == {str(done.pk), str(running.pk), str(queued.pk)}
    assert next(j for j in listed["results"] if j["id"] == str(done.pk))["created_by"] == "admin"
    active = api.get(f"{API}/replicationJobs/", {"vault": vault.pk, "active": "true"}).json()
    assert {j["id"] for j in active["results"]} == {str(running.pk), str(queued.pk)}
    by_type = api.get(f"{API}/replicationJobs/", {"type": JobType.RESYNC}).json()
    assert [j["id"] for j in by_type["results"]] == [str(running.pk)]
    by_state = api.get(f"{API}/replicationJobs/", {"state": JobState.FAILED}).json()
    assert by_state["count"] == 1
    assert_error(api.get(f"{API}/replicationJobs/", {"state": "EXPLODED"}), 400)

    # A queued job is cancelled at once; a running one is asked to stop.
    response = api.post(f"{API}/replicationJobs/{queued.pk}/cancel/")
    assert response.status_code == 200, response.content
    assert response.json()["state"] == JobState.CANCELLED
    # The item it would have enabled is left where an admin can act on it.
    enabling.refresh_from_db()
    assert enabling.protection_state == ProtectionState.ENABLE_FAILED
    response = api.post(f"{API}/replicationJobs/{running.pk}/cancel/")
    assert response.json()["state"] == JobState.CANCELLING and response.json()["cancel_requested"] is True

    # A finished job cannot be cancelled: 409 with the state it is in.
    error = assert_error(api.post(f"{API}/replicationJobs/{done.pk}/cancel/"), 409, "invalid_state")
    assert error["current_state"] == JobState.SUCCEEDED
    assert error["operation"] == "cancel"
    error = assert_error(api.post(f"{API}/replicationJobs/{queued.pk}/cancel/"), 409, "invalid_state")
    assert error["current_state"] == JobState.CANCELLED
    done.refresh_from_db()
    assert done.state == JobState.SUCCEEDED


def test_viewer_cannot_cancel_a_job(viewer_api, vault):
    queued = _job(vault, JobState.QUEUED)
    assert_error(viewer_api.post(f"{API}/replicationJobs/{queued.pk}/cancel/"), 403)
    queued.refresh_from_db()
    assert queued.state == JobState.QUEUED


# --- recovery plans ----------------------------------------------------------------------


@pytest.fixture
def items(vault):
    policy = PolicyFactory(vault=vault)
    server = ProcessServerFactory(vault=vault)
    return [ProtectedItemFactory(vault=vault, policy=policy, process_server=server) for _ in range(3)]


def _plan_body(vault, items, **overrides) -> dict:
    body = {
        "vault": vault.pk,
        "name": "web-tier",
        "description": "Databases first, then the web servers",
        "groups": [
            {
                "order": 1,
                "name": "Databases",
                "items": [str(items[0].pk)],
                "actions": [
                    {"phase": "PRE", "order": 1, "kind": "MANUAL", "name": "Stop writes",
                     "instructions": "Put the application in maintenance mode."},
                ],
            },
            {
                "order": 2,
                "name": "Web",
                "items": [str(items[1].pk), str(items[2].pk)],
                "actions": [
                    {"phase": "POST", "order": 1, "kind": "SCRIPT", "name": "Update DNS", "script": "/opt/dr/dns.sh"},
                ],
            },
        ],
    }
    body.update(overrides)
    return body


def test_create_recovery_plan_with_ordered_groups_and_actions(api, vault, items):
    response = api.post(f"{API}/replicationRecoveryPlans/", _plan_body(vault, items), format="json")
    assert response.status_code == 201, response.content
    plan = response.json()
    assert [g["order"] for g in plan["groups"]] == [1, 2]
    assert plan["groups"][0]["items"] == [str(items[0].pk)]
    assert sorted(plan["groups"][1]["items"]) == sorted([str(items[1].pk), str(items[2].pk)])
    assert plan["groups"][0]["actions"][0]["kind"] == "MANUAL"
    assert plan["groups"][1]["actions"][0]["script"] == "/opt/dr/dns.sh"
    stored = RecoveryPlan.objects.get(pk=plan["id"])
    assert [g.name for g in stored.groups.order_by("order")] == ["Databases", "Web"]
    assert api.get(f"{API}/replicationRecoveryPlans/{plan['id']}/").json()["groups"] == plan["groups"]
    error = assert_error(api.post(f"{API}/replicationRecoveryPlans/", _plan_body(vault, items), format="json"), 409)
    assert "web-tier" in error["message"]


@pytest.mark.parametrize(
    ("action", "field"),
    [
        ({"phase": "PRE", "kind": "SCRIPT", "name": "Run", "script": ""}, "script"),
        ({"phase": "POST", "kind": "MANUAL", "name": "Check"}, "instructions"),
    ],
)
def test_recovery_plan_action_needs_its_content(api, vault, items, action, field):
    body = _plan_body(vault, items)
    body["groups"][0]["actions"] = [action]
    error = assert_error(api.post(f"{API}/replicationRecoveryPlans/", body, format="json"), 400, "invalid")
    assert field in json.dumps(error["fields"])
    assert not RecoveryPlan.objects.exists()


def test_recovery_plan_item_in_two_groups_is_refused(api, vault, items):
    body = _plan_body(vault, items)
    body["groups"][1]["items"].append(str(items[0].pk))
    error = assert_error(api.post(f"{API}/replicationRecoveryPlans/", body, format="json"), 400, "invalid")
    assert "more than one group" in error["message"]
    assert items[0].name in error["message"]
    assert not RecoveryPlan.objects.exists()


def test_recovery_plan_item_of_another_vault_is_refused(api, vault, items):
    stranger = ProtectedItemFactory()
    body = _plan_body(vault, items)
    body["groups"][0]["items"].append(str(stranger.pk))
    error = assert_error(api.post(f"{API}/replicationRecoveryPlans/", body, format="json"), 400, "invalid")
    assert "another vault" in error["message"]
    assert not RecoveryPlan.objects.exists()


# --- alerts ------------------------------------------------------------------------------


def test_acknowledge_alert(api, vault, admin_user):
    alert, created = alert_raise(vault=vault, key="ps_heartbeat:1", kind="ps_heartbeat",
                                 message="Process server ps-1 stopped reporting", severity=Severity.CRITICAL)
    assert created
    listed = api.get(f"{API}/replicationAlerts/", {"vault": vault.pk, "acknowledged": "false"}).json()
    assert [a["id"] for a in listed["results"]] == [str(alert.pk)]
    response = api.post(f"{API}/replicationAlerts/{alert.pk}/acknowledge/")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["acknowledged"] is True and body["acknowledged_by"] == admin_user.pk
    assert body["state"] == AlertState.ACTIVE  # acknowledged, still going on
    assert api.get(f"{API}/replicationAlerts/", {"vault": vault.pk, "acknowledged": "false"}).json()["count"] == 0
    # Acknowledging twice keeps the first acknowledgement.
    first_at = Alert.objects.get(pk=alert.pk).acknowledged_at
    assert api.post(f"{API}/replicationAlerts/{alert.pk}/acknowledge/").status_code == 200
    assert Alert.objects.get(pk=alert.pk).acknowledged_at == first_at


# --- query counts ------------------------------------------------------------------------


def _count_queries(client, url) -> tuple[int, int]:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url, {"page_size": 100})
    assert response.status_code == 200, response.content
    return len(ctx.captured_queries), response.json()["count"]


def _grow(make, n: int) -> None:
    for _ in range(n):
        make()


@pytest.mark.parametrize("resource", ["replicationProtectedItems", "replicationProtectableItems", "replicationJobs",
                                      "replicationAlerts"])
def test_api_lists_use_a_fixed_number_of_queries(api, vault, admin_user, resource):
    server = ProcessServerFactory(vault=vault)
    state = {"n": 0}

    def make():
        state["n"] += 1
        n = state["n"]
        if resource == "replicationProtectedItems":
            # Each item with its own policy and two replica disks.
            item = ProtectedItemFactory(vault=vault, process_server=server)
            ReplicaDiskFactory(item=item, index=0)
            ReplicaDiskFactory(item=item, index=1)
        elif resource == "replicationProtectableItems":
            machine = MachineFactory(vault=vault)
            DiskFactory(machine=machine)
            DiskFactory(machine=machine)
            if n % 2:
                ProtectedItemFactory(vault=vault, machine=machine, process_server=server)
        elif resource == "replicationJobs":
            _job(vault, JobState.SUCCEEDED, created_by=admin_user)
        else:
            item = ProtectedItemFactory(vault=vault, process_server=server)
            job = _job(vault, JobState.FAILED)
            alert, _ = alert_raise(vault=vault, key=f"rpo:{n}", kind="rpo", message=f"RPO of item {n} is high",
                                   protected_item=item, process_server=server, job=job)
            if n % 2:
                alert.acknowledged, alert.acknowledged_by = True, admin_user
                alert.save()

    url = f"{API}/{resource}/?vault={vault.pk}"
    _grow(make, 5)
    few, count = _count_queries(api, url)
    assert count == 5
    _grow(make, 55)
    many, count = _count_queries(api, url)
    assert count == 60
    assert many == few, f"{resource}: {few} queries for 5 rows, {many} for 60"
    assert few <= 6


def test_protectable_items_show_disks_and_protection(api, vault):
    machine = MachineFactory(vault=vault, name="db-01")
    DiskFactory(machine=machine, key=2000, label="Hard disk 1", capacity_bytes=10 << 30)
    item = ProtectedItemFactory(vault=vault, machine=machine)
    MachineFactory(vault=vault, name="web-01")
    body = api.get(f"{API}/replicationProtectableItems/", {"vault": vault.pk, "ordering": "name"}).json()
    db, web = body["results"]
    assert db["protected_item"] == str(item.pk)
    assert db["disks"] == [{"key": 2000, "label": "Hard disk 1", "capacity_bytes": 10 << 30, "backing_file": "",
                            "datastore": ""}]
    assert web["protected_item"] is None
    protected = api.get(f"{API}/replicationProtectableItems/", {"vault": vault.pk, "protected": "true"}).json()
    assert [m["name"] for m in protected["results"]] == ["db-01"]
    assert ProtectedItem.objects.count() == 1
