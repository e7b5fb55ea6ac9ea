"""Every input answered clearly: bad input is a 4xx with a sentence, and nothing changes.

The API lists and the portal pages are discovered from the URL configuration, so a list or
page added later is covered without touching this file.
"""
from __future__ import annotations

import json

import django_filters
import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework.test import APIClient

from core.filters import IdFilter
from replication.models import MobilityAgent, ProtectedItem
from tests.factories import MachineFactory, ProtectedItemFactory, VaultFactory
from vault.models import Vault, VCenter

BAD_IDS = [
    str(2**63),  # one past the largest bigint
    str(2**64),
    "-1",
    "0",
    "abc",
    "1.5",
    "١٢",  # Arabic-Indic digits: int() takes them
    "²",  # a superscript two: str.isdigit() says yes, int() says no
]
PASS = "correct horse battery staple"


def _walk(patterns, prefix=""):
    for p in patterns:
        if isinstance(p, URLResolver):
            yield from _walk(p.url_patterns, prefix + str(p.pattern))
        elif isinstance(p, URLPattern):
            yield prefix + str(p.pattern), p


def _api_lists():
    """(path, viewset class) of every API list route."""
    found = {}
    for route, p in _walk(get_resolver().url_patterns):
        actions = getattr(p.callback, "actions", None) or {}
        if route.startswith("api/v1/") and actions.get("get") == "list" and "<format>" not in route:
            path = "/" + route.replace("^", "").replace("/?$", "").replace("$", "").rstrip("/") + "/"
            found[path] = p.callback.cls
    return sorted(found.items())


def _id_filters(viewset_cls) -> list[str]:
    """The filters of a list that take an integer id or number."""
    view = viewset_cls()
    view.action, view.kwargs, view.format_kwarg = "list", {}, None
    filterset_class = DjangoFilterBackend().get_filterset_class(view, viewset_cls.queryset)
    if filterset_class is None:
        return []
    names = []
    for name, f in filterset_class.base_filters.items():
        if isinstance(f, (django_filters.NumberFilter, IdFilter)):
            names.append(name)
        elif isinstance(f, django_filters.ModelChoiceFilter):
            pk = f.queryset.model._meta.pk if f.queryset is not None else None
            if pk is not None and pk.get_internal_type() in ("AutoField", "BigAutoField", "IntegerField", "BigIntegerField"):
                names.append(name)
    return names


API_CASES = [(path, name) for path, cls in _api_lists() for name in _id_filters(cls)]


def _portal_pages():
    """Every portal page without a parameter in its path (those are the lists that filter)."""
    pages = []
    for route, p in _walk(get_resolver().url_patterns):
        if route.startswith(("api/", "admin/")) or p.pattern.converters or "<" in route:
            continue
        pages.append("/" + route)
    return sorted(set(pages))


PORTAL_PARAMS = sorted({name for _path, name in API_CASES} | {"vault", "page"})


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] and body["error"]["message"].endswith((".", ")")), body
    return body["error"]


def test_discovery_finds_the_lists_and_pages():
    paths = [p for p, _ in _api_lists()]
    assert "/api/v1/replicationProtectedItems/" in paths and "/api/v1/replicationJobs/" in paths
    assert ("/api/v1/replicationProtectedItems/", "vault") in API_CASES
    assert {"/items/", "/jobs/", "/alerts/"} <= set(_portal_pages())


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize(("path", "param"), API_CASES)
def test_api_list_refuses_a_bad_integer_filter(api, vault, path, param, bad):
    r = api.get(path, {param: bad})
    assert r.status_code == 400, (r.status_code, r.content[:300])
    assert param in _error(r)["message"]


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("page", _portal_pages())
def test_portal_page_answers_a_bad_filter_clearly(client, admin_user, page, bad):
    vault = VaultFactory()
    client.force_login(admin_user)
    client.get("/", {"vault": vault.pk})
    r = client.get(page, dict.fromkeys(PORTAL_PARAMS, bad))
    assert r.status_code in (200, 302, 400, 403, 405), (r.status_code, r.content[:300])
    assert client.session["vault_id"] == vault.pk  # the bad ?vault= did not switch vaults
    if r.status_code == 200 and r.context and "filter" in r.context:
        assert "was not understood" in r.content.decode(), r.content[:300]


def test_a_good_portal_filter_still_filters(client, admin_user):
    vault = VaultFactory()
    other = VaultFactory()
    client.force_login(admin_user)
    client.get("/", {"vault": other.pk})
    assert client.session["vault_id"] == other.pk
    client.get("/", {"vault": str(vault.pk)})
    assert client.session["vault_id"] == vault.pk


# --- bodies ------------------------------------------------------------------------------


def test_a_3mb_json_body_is_refused(api, vault):
    body = json.dumps({"name": "x" * (3 * 1024 * 1024)})
    r = api.post("/api/v1/vaults/", body, content_type="application/json")
    assert r.status_code == 413, r.content[:300]
    assert "too large" in _error(r)["message"]
    assert Vault.objects.count() == 1


def test_a_3mb_body_to_the_anonymous_agent_registration_is_refused(db):
    VaultFactory(passphrase=PASS)
    body = json.dumps({"passphrase": PASS, "hostname": "h" * (3 * 1024 * 1024), "machine": {"name": "m", "disks": []}})
    r = APIClient().post("/api/v1/agents/register", body, content_type="application/json")
    assert r.status_code == 413, r.content[:300]
    _error(r)
    assert not MobilityAgent.objects.exists()


def test_a_3mb_form_body_is_refused(api, client, admin_user, vault):
    r = api.post("/api/v1/vaults/", {"name": "x" * (3 * 1024 * 1024)}, format="multipart")
    assert r.status_code == 413, r.content[:300]
    _error(r)
    client.force_login(admin_user)
    r = client.post("/vaults/new/", {"name": "x" * (3 * 1024 * 1024)})
    assert r.status_code == 413, r.content[:300]
    assert b"too large" in r.content
    assert Vault.objects.count() == 1


@pytest.mark.parametrize("path", ["/api/v1/vaults/", "/api/v1/agents/register"])
def test_json_nested_2000_levels_is_refused(api, vault, path):
    body = "[" * 2000 + "]" * 2000
    r = api.post(path, body, content_type="application/json")
    assert r.status_code == 400, r.content[:300]
    assert "nested" in _error(r)["message"]
    assert Vault.objects.count() == 1


def test_1200_form_fields_are_refused(api, client, admin_user, vault):
    fields = {f"f{i}": "x" for i in range(1200)}
    r = api.post("/api/v1/vaults/", fields, format="multipart")
    assert r.status_code == 400, r.content[:300]
    assert "fields" in _error(r)["message"]
    client.force_login(admin_user)
    r = client.post("/vaults/new/", {**fields, "name": "new-vault"})
    assert r.status_code == 400, r.content[:300]
    assert b"too many fields" in r.content
    assert Vault.objects.count() == 1


# --- the agent API --------------------------------------------------------------------------


@pytest.fixture
def agent(db):
    vault = VaultFactory(passphrase=PASS)
    anon = APIClient()
    r = anon.post("/api/v1/agents/register", {
        "passphrase": PASS, "hostname": "files-01.corp",
        "machine": {"name": "files-01", "disks": [{"key": 0, "path": "/dev/sda", "capacity_bytes": 8 * 1024 * 1024}]},
    }, format="json")
    assert r.status_code == 201, r.content
    agent = MobilityAgent.objects.get(pk=r.json()["agent_id"])
    item = ProtectedItemFactory(vault=vault, machine=agent.machine, name="files-01")
    anon.credentials(HTTP_AUTHORIZATION=f"Bearer {r.json()['token']}")
    return anon, agent, item


@pytest.mark.parametrize("field", ["acked_seq", "backlog_bytes", "progress"])
@pytest.mark.parametrize("value", [2**64, 2**63, -1, "12", 1e308])
def test_agent_heartbeat_refuses_out_of_range_numbers(agent, field, value):
    anon, agent_, item = agent
    before = ProtectedItem.objects.filter(pk=item.pk).values().get()
    r = anon.post(f"/api/v1/agents/{agent_.pk}/heartbeat", {"items": [{"item_id": str(item.pk), field: value}]}, format="json")
    assert r.status_code == 400, r.content[:300]
    assert field in _error(r)["message"]
    assert ProtectedItem.objects.filter(pk=item.pk).values().get() == before


def test_agent_heartbeat_with_good_numbers_still_records(agent):
    anon, agent_, item = agent
    r = anon.post(f"/api/v1/agents/{agent_.pk}/heartbeat", {"items": [{"item_id": str(item.pk), "acked_seq": 2**62, "backlog_bytes": 5}]}, format="json")
    assert r.status_code == 204, r.content
    item.refresh_from_db()
    assert (item.acked_seq, item.agent_backlog_bytes) == (2**62, 5)


@pytest.mark.parametrize("body", [
    {"items": {str(2**64): {"acked_seq": 1}}},
    {"cache_free_bytes": 2**64},
    {"pending_upload_bytes": 2**63},
])
def test_process_server_heartbeat_refuses_out_of_range_numbers(db, body):
    from replication.agents import process_server_token
    from tests.factories import ProcessServerFactory

    ps = ProcessServerFactory(vault=VaultFactory())
    token = process_server_token(server=ps)
    r = APIClient().post(f"/api/v1/processServers/{ps.pk}/heartbeat", body, format="json", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert r.status_code in (204, 400), r.content[:300]
    if "items" not in body:
        assert r.status_code == 400
        _error(r)


@pytest.mark.parametrize("disk_key", [2**64, 2**31])
def test_agent_registration_refuses_out_of_range_disk_numbers(db, disk_key):
    VaultFactory(passphrase=PASS)
    r = APIClient().post("/api/v1/agents/register", {
        "passphrase": PASS, "hostname": "h1",
        "machine": {"name": "m1", "disks": [{"key": disk_key, "path": "/dev/sda", "capacity_bytes": 2**70}]},
    }, format="json")
    assert r.status_code == 400, r.content[:300]
    _error(r)
    assert not MobilityAgent.objects.exists()


# --- deleting what is still in use -------------------------------------------------------


def test_deleting_a_vcenter_with_protected_machines_is_409(api, vault):
    vcenter = VCenter.objects.create(vault=vault, name="vc1", host="vc1.corp", username="u")
    item = ProtectedItemFactory(vault=vault, machine=MachineFactory(vault=vault, vcenter=vcenter, source="vcenter"))
    r = api.delete(f"/api/v1/replicationvCenters/{vcenter.pk}/")
    assert r.status_code == 409, r.content[:300]
    assert "disable replication" in _error(r)["message"]
    assert VCenter.objects.filter(pk=vcenter.pk).exists() and ProtectedItem.objects.filter(pk=item.pk).exists()


def test_deleting_a_vault_with_protected_machines_is_409(api, vault):
    item = ProtectedItemFactory(vault=vault)
    r = api.delete(f"/api/v1/vaults/{vault.pk}/")
    assert r.status_code == 409, r.content[:300]
    assert "disable replication" in _error(r)["message"]
    assert Vault.objects.filter(pk=vault.pk).exists() and ProtectedItem.objects.filter(pk=item.pk).exists()


def test_deleting_an_empty_vcenter_still_works(api, vault):
    vcenter = VCenter.objects.create(vault=vault, name="vc1", host="vc1.corp", username="u")
    MachineFactory(vault=vault, vcenter=vcenter, source="vcenter")
    assert api.delete(f"/api/v1/replicationvCenters/{vcenter.pk}/").status_code == 204
    assert not VCenter.objects.filter(pk=vcenter.pk).exists()


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ops\r\nBcc: x@example.com", "ops\nvault", "ops\x00", "ops\x1b[31m", "ops\u2028x"])
def test_names_with_line_breaks_or_control_characters_are_refused(api, client, admin_user, vault, name):
    r = api.post("/api/v1/vaults/", {"name": name, "passphrase": PASS}, format="json")
    assert r.status_code == 400, r.content[:300]
    assert "control characters" in _error(r)["message"]
    r = api.patch(f"/api/v1/vaults/{vault.pk}/", {"name": name}, format="json")
    assert r.status_code == 400, r.content[:300]
    r = api.post("/api/v1/replicationPolicies/", {"vault": vault.pk, "name": name}, format="json")
    assert r.status_code == 400, r.content[:300]
    r = api.post("/api/v1/replicationvCenters/", {"vault": vault.pk, "name": name, "host": "vc", "username": "u", "password": "p"}, format="json")
    assert r.status_code == 400, r.content[:300]
    client.force_login(admin_user)
    r = client.post("/vaults/new/", {"name": name, "passphrase": PASS * 2, "passphrase_confirm": PASS * 2})
    assert r.status_code == 200 and b"control characters" in r.content
    r = APIClient().post("/api/v1/agents/register", {
        "passphrase": PASS, "hostname": name,
        "machine": {"name": name, "disks": [{"key": 0, "path": "/dev/sda", "capacity_bytes": 8 * 1024 * 1024}]}}, format="json")
    assert r.status_code == 400, r.content[:300]
    assert Vault.objects.count() == 1 and vault.name == Vault.objects.get().name


@pytest.mark.parametrize("instance_uuid", ["../../etc", "a/b", "x" * 65, "id\x00"])
def test_agent_machine_ids_never_become_paths(db, instance_uuid):
    VaultFactory(passphrase=PASS)
    r = APIClient().post("/api/v1/agents/register", {
        "passphrase": PASS, "hostname": "h1",
        "machine": {"name": "m1", "instance_uuid": instance_uuid,
                    "disks": [{"key": 0, "path": "/dev/sda", "capacity_bytes": 8 * 1024 * 1024}]},
    }, format="json")
    assert r.status_code == 400, r.content[:300]
    assert "instance_uuid" in _error(r)["message"]
    assert not MobilityAgent.objects.exists()


CREATE_BODIES = {
    "/api/v1/processServers/": {"host": "127.0.0.1"},
    "/api/v1/masterTargetServers/": {"host": "127.0.0.1"},
    "/api/v1/recoverySites/": {"kind": "SIMULATED", "host": "/tmp/inputs-never", "networks": [
        {"name": "net", "purpose": "RECOVERY"}, {"name": "test", "purpose": "TEST"}]},
    "/api/v1/replicationGroups/": {"items": ["<item>"]},
    "/api/v1/replicationRecoveryPlans/": {"groups": [{"items": ["<item>"]}]},
}


@pytest.mark.parametrize("path", sorted(CREATE_BODIES))
def test_every_api_create_refuses_a_name_with_a_line_break(api, vault, path):
    item = ProtectedItemFactory(vault=vault)
    body = json.loads(json.dumps(CREATE_BODIES[path]).replace("<item>", str(item.pk)))
    before = api.get(path).json()["count"]
    r = api.post(path, {"vault": vault.pk, "name": "two\r\nlines", **body}, format="json")
    assert r.status_code == 400, r.content[:300]
    assert "control characters" in _error(r)["message"]
    assert api.get(path).json()["count"] == before


def test_disk_image_file_names_hold_ids_only(vault):
    from replication.api.views import image_filename
    from tests.factories import RecoveryPointFactory

    item = ProtectedItemFactory(vault=vault, name='evil"\r\n/../name')
    point = RecoveryPointFactory(item=item)
    name = image_filename(item=item, point=point, disk_index=0)
    assert name.startswith(f"{item.pk}-disk0-") and name.endswith(".img")
    assert all(ch.isascii() and (ch.isalnum() or ch in "-.") for ch in name)


def test_process_server_keys_are_not_cached(api, vault):
    from tests.factories import ProcessServerFactory

    ps = ProcessServerFactory(vault=vault)
    r = api.get(f"/api/v1/processServers/{ps.pk}/configuration")
    assert r.status_code == 200 and r["Cache-Control"] == "no-store"


def test_a_plan_group_name_with_a_line_break_is_refused(api, vault):
    item = ProtectedItemFactory(vault=vault)
    path = "/api/v1/replicationRecoveryPlans/"
    r = api.post(path, {"vault": vault.pk, "name": "plan", "groups": [{"name": "web\ntier", "items": [str(item.pk)]}]},
                 format="json")
    assert r.status_code == 400, r.content[:300]
    assert "control characters" in _error(r)["message"]
    assert api.get(path).json()["count"] == 0
