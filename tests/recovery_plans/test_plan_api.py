"""replicationRecoveryPlans: the plan editor through the REST API.

Every refused plan is a 400 (409 for a name already taken) with a sentence that says what is
wrong, and leaves the database as it was; every state a plan can be in is reported.
"""
from __future__ import annotations

import copy

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from recovery_plans.models import RecoveryPlan, RecoveryPlanAction, RecoveryPlanGroup, RecoveryPlanNetworkMapping
from replication.choices import ProtectionState as P
from replication.choices import TestFailoverState as T
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import grant_role
from tests.recovery_plans.plan_data import protected_items, recovery_site, stranger_item
from tests.vault.test_api import assert_error

pytestmark = pytest.mark.django_db

PLANS = "/api/v1/replicationRecoveryPlans"


@pytest.fixture
def site(vault):
    return recovery_site(vault)


@pytest.fixture
def items(vault, site):
    return protected_items(vault, site=site)


def _body(vault, items, site) -> dict:
    nets = {n.name: n.pk for n in site.networks.all()}
    return {
        "vault": vault.pk,
        "name": "three-tier",
        "description": "Databases, then the application, then the web servers",
        "recovery_point_type": "latest_processed",
        "network_mappings": [{"site": site.pk, "recovery_network": nets["dmz-net"], "test_network": nets["lab-net"]}],
        "groups": [
            {"name": "Databases", "items": [str(items[0].pk)],
             "actions": [{"phase": "POST", "kind": "SCRIPT", "name": "Check the database", "script": "/opt/dr/db-check.sh",
                          "timeout_seconds": 120}]},
            {"name": "Application", "items": [str(items[1].pk)],
             "actions": [{"phase": "PRE", "kind": "MANUAL", "name": "Confirm replication of the queue",
                          "instructions": "Check the queue's replica is current, then resume."}]},
            {"name": "Web", "items": [str(items[2].pk)]},
        ],
    }


def _snapshot() -> list:
    """Everything the editor writes, to show a refused request changed nothing."""
    return [
        list(RecoveryPlan.objects.values_list("id", "name", "description", "recovery_point_type").order_by("id")),
        list(RecoveryPlanGroup.objects.values_list("id", "plan_id", "order", "name").order_by("id")),
        list(RecoveryPlanGroup.items.through.objects.values_list("recoveryplangroup_id", "protecteditem_id").order_by("id")),
        list(RecoveryPlanAction.objects.values_list("id", "group_id", "phase", "order", "kind", "name", "script",
                                                    "timeout_seconds", "instructions").order_by("id")),
        list(RecoveryPlanNetworkMapping.objects.values_list("id", "plan_id", "site_id", "recovery_network_id",
                                                            "test_network_id").order_by("id")),
    ]


def test_create_a_three_group_plan_with_actions_and_defaults(api, vault, items, site):
    response = api.post(PLANS, _body(vault, items, site), format="json")
    assert response.status_code == 201, response.content
    plan = response.json()
    assert plan["name"] == "three-tier" and plan["recovery_point_type"] == "latest_processed"
    assert [(g["order"], g["name"], g["items"]) for g in plan["groups"]] == [
        (1, "Databases", [str(items[0].pk)]), (2, "Application", [str(items[1].pk)]), (3, "Web", [str(items[2].pk)])
    ]
    script = plan["groups"][0]["actions"][0]
    assert script == {"phase": "POST", "order": 1, "kind": "SCRIPT", "name": "Check the database",
                      "script": "/opt/dr/db-check.sh", "timeout_seconds": 120, "instructions": ""}
    assert plan["groups"][1]["actions"][0]["kind"] == "MANUAL"
    assert plan["state"] == "READY" and plan["state_description"] == "Ready to fail over" and plan["problems"] == []
    # The plan's network mapping wins over the items' own.
    assert {(s["name"], s["recovery_network"], s["test_network"]) for s in plan["item_states"]} == {
        ("db-01", "dmz-net", "lab-net"), ("app-01", "dmz-net", "lab-net"), ("web-01", "dmz-net", "lab-net")
    }
    assert api.get(f"{PLANS}/{plan['id']}").json() == plan


def _two_groups(body, items):
    body["groups"][1]["items"].append(str(items[0].pk))


def _twice_in_one(body, items):
    body["groups"][0]["items"].append(str(items[0].pk))


def _no_groups(body, items):
    body["groups"] = []


def _groups_missing(body, items):
    del body["groups"]


def _groups_without_items(body, items):
    for g in body["groups"]:
        g["items"] = []


def _stranger(body, items):
    body["groups"][2]["items"].append(str(stranger_item().pk))


def _action(**fields):
    def change(body, items):
        body["groups"][0]["actions"] = [{"phase": "PRE", "kind": "SCRIPT", "name": "Run it", **fields}]
    return change


def _mapping(**fields):
    def change(body, items):
        site = ProtectedItem.objects.get(pk=items[0].pk).recovery_site
        nets = {n.name: n.pk for n in site.networks.all()}
        mapping = {"site": site.pk, "recovery_network": None, "test_network": None}
        mapping.update({k: nets.get(v, v) for k, v in fields.items()})
        if mapping["site"] == "other-vault":
            mapping["site"] = recovery_site(stranger_item().vault, "site-west").pk
        if mapping["site"] == "twice":
            mapping["site"] = site.pk
            body["network_mappings"] = [dict(body["network_mappings"][0])]
        else:
            body["network_mappings"] = []
        body["network_mappings"].append(mapping)
    return change


def _set(**fields):
    def change(body, items):
        body.update(fields)
    return change


def _group_orders(body, items):
    body["groups"][0]["order"] = 2
    body["groups"][1]["order"] = 2


BAD_PLANS = [
    ("item in two groups", _two_groups, "'db-01' is in more than one group (both in Databases and in Application)"),
    ("item twice in one group", _twice_in_one, "'db-01' is in more than one group (twice in that group)"),
    ("no groups", _no_groups, "A recovery plan needs at least one protected item"),
    ("groups left out", _groups_missing, "A recovery plan needs at least one protected item"),
    ("groups without items", _groups_without_items, "A recovery plan needs at least one protected item"),
    ("item of another vault", _stranger, "'elsewhere-01' belongs to another vault"),
    ("script without a command", _action(script=""), "'Run it' in Databases: A script action needs the command to run."),
    ("script of blanks", _action(script="   "), "A script action needs the command to run."),
    ("manual without instructions", _action(kind="MANUAL", instructions=" "), "A manual action needs instructions"),
    ("timeout zero", _action(script="/bin/true", timeout_seconds=0), "A script's timeout is at least 1 second."),
    ("timeout negative", _action(script="/bin/true", timeout_seconds=-5), "A script's timeout is at least 1 second."),
    ("timeout too long", _action(script="/bin/true", timeout_seconds=7201),
     "'Run it' in Databases: A script's timeout is at most 7200 seconds (two hours)."),
    ("action without a name", _action(script="/bin/true", name=""), "Every action of Databases needs a name."),
    ("action of no phase", _action(script="/bin/true", phase="DURING"), "phase"),
    ("custom point as a default", _set(recovery_point_type="custom"), "recovery_point_type"),
    ("no name", _set(name="  "), "A recovery plan needs a name."),
    ("duplicate group order", _group_orders, "Each group needs its own order number."),
    ("test network as recovery network", _mapping(recovery_network="lab-net"),
     "The network 'lab-net' is isolated test network, not recovery network."),
    ("recovery network as test network", _mapping(test_network="recovery-net"),
     "The network 'recovery-net' is recovery network, not isolated test network."),
    ("site of another vault", _mapping(site="other-vault"), "belongs to another vault"),
    ("site mapped twice", _mapping(site="twice"), "The recovery site site-east is mapped twice"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_PLANS, ids=[c[0] for c in BAD_PLANS])
def test_a_bad_plan_is_refused_with_a_sentence_and_nothing_is_created(api, vault, items, site, case, change, message):
    body = _body(vault, items, site)
    change(body, items)
    before = _snapshot()
    error = assert_error(api.post(PLANS, body, format="json"), 400, "invalid")
    assert message in error["message"], error
    assert error["message"].rstrip()[-1] == "." or message in ("phase", "recovery_point_type"), error
    assert _snapshot() == before


def test_a_network_of_another_site_is_refused(api, vault, items, site):
    other = recovery_site(vault, "site-west")
    body = _body(vault, items, site)
    body["network_mappings"][0]["recovery_network"] = other.networks.get(name="recovery-net").pk
    error = assert_error(api.post(PLANS, body, format="json"), 400, "invalid")
    assert error["message"] == "The network 'recovery-net' is not a network of the recovery site site-east."
    assert not RecoveryPlan.objects.exists()


def test_a_name_taken_in_the_vault_is_a_conflict(api, vault, items, site):
    assert api.post(PLANS, _body(vault, items, site), format="json").status_code == 201
    before = _snapshot()
    error = assert_error(api.post(PLANS, _body(vault, items, site), format="json"), 409, "conflict")
    assert error["message"] == "A recovery plan named 'three-tier' already exists in this vault."
    assert _snapshot() == before


@pytest.fixture
def plan(api, vault, items, site):
    response = api.post(PLANS, _body(vault, items, site), format="json")
    assert response.status_code == 201, response.content
    return response.json()


def _groups_of(plan) -> list[dict]:
    return [{k: g[k] for k in ("name", "items", "actions")} for g in plan["groups"]]


def test_rename_reorder_groups_and_move_an_item(api, plan, items):
    groups = _groups_of(plan)
    # Web first, then the databases with the application server moved in, no application group.
    groups[0]["items"].append(groups[1]["items"][0])
    body = {"name": "three-tier, reordered", "groups": [groups[2], groups[0]], "recovery_point_type": "latest"}
    response = api.patch(f"{PLANS}/{plan['id']}", body, format="json")
    assert response.status_code == 200, response.content
    changed = response.json()
    assert changed["name"] == "three-tier, reordered" and changed["recovery_point_type"] == "latest"
    assert [(g["order"], g["name"]) for g in changed["groups"]] == [(1, "Web"), (2, "Databases")]
    assert sorted(changed["groups"][1]["items"]) == sorted([str(items[0].pk), str(items[1].pk)])
    assert changed["groups"][1]["actions"][0]["script"] == "/opt/dr/db-check.sh"
    assert changed["network_mappings"] == plan["network_mappings"]  # left out: unchanged
    stored = RecoveryPlan.objects.get(pk=plan["id"])
    assert [(g.order, g.name) for g in stored.groups.all()] == [(1, "Web"), (2, "Databases")]


@pytest.mark.parametrize(("case", "body", "message"), [
    ("empty", {"groups": []}, "A recovery plan needs at least one protected item"),
    ("two groups", "two-groups", "is in more than one group"),
    ("script without command", "no-command", "A script action needs the command to run."),
    ("timeout out of range", "timeout", "A script's timeout is at most 7200 seconds"),
    ("another vault", "stranger", "belongs to another vault"),
    ("blank name", {"name": ""}, "A recovery plan needs a name."),
])
def test_a_bad_change_is_refused_and_the_plan_stays_as_it_was(api, plan, vault, case, body, message):
    groups = _groups_of(plan)
    if body == "two-groups":
        groups[2]["items"] += groups[0]["items"]
    elif body == "no-command":
        groups[0]["actions"][0]["script"] = ""
    elif body == "timeout":
        groups[0]["actions"][0]["timeout_seconds"] = 86400
    elif body == "stranger":
        groups[0]["items"].append(str(stranger_item().pk))
    body = body if isinstance(body, dict) else {"groups": groups}
    before, shown = _snapshot(), api.get(f"{PLANS}/{plan['id']}").json()
    error = assert_error(api.patch(f"{PLANS}/{plan['id']}", {**body, "description": "changed"}, format="json"), 400)
    assert message in error["message"], error
    assert _snapshot() == before
    assert api.get(f"{PLANS}/{plan['id']}").json() == shown


def test_a_plan_cannot_move_to_another_vault(api, plan):
    other = stranger_item().vault
    error = assert_error(api.patch(f"{PLANS}/{plan['id']}", {"vault": other.pk}, format="json"), 400)
    assert error["message"] == "A recovery plan cannot move to another vault; create one there instead."


def test_put_replaces_the_whole_plan(api, plan, vault, items, site):
    body = copy.deepcopy(_body(vault, items, site))
    body["groups"] = [{"name": "Everything", "items": [str(i.pk) for i in items]}]
    body["network_mappings"] = []
    changed = api.put(f"{PLANS}/{plan['id']}", body, format="json").json()
    assert [(g["name"], len(g["items"]), g["actions"]) for g in changed["groups"]] == [("Everything", 3, [])]
    assert changed["network_mappings"] == []
    assert {s["recovery_network"] for s in changed["item_states"]} == {"dmz-net"}  # the site's first by name
    assert not RecoveryPlanAction.objects.exists()


def test_delete_a_plan_keeps_its_items(api, plan, items):
    assert api.delete(f"{PLANS}/{plan['id']}").status_code == 204
    assert not RecoveryPlan.objects.exists() and not RecoveryPlanGroup.objects.exists()
    assert ProtectedItem.objects.filter(pk__in=[i.pk for i in items]).count() == 3


def test_a_viewer_reads_plans_but_cannot_change_them(viewer_user, plan, vault, items, site):
    grant_role(viewer_user, vault, "READER")
    client = APIClient()
    client.force_authenticate(viewer_user)
    assert client.get(f"{PLANS}/{plan['id']}").json()["name"] == "three-tier"
    before = _snapshot()
    assert_error(client.post(PLANS, {**_body(vault, items, site), "name": "mine"}, format="json"), 403)
    assert_error(client.patch(f"{PLANS}/{plan['id']}", {"name": "mine"}, format="json"), 403)
    assert_error(client.delete(f"{PLANS}/{plan['id']}"), 403)
    assert _snapshot() == before


def _state(api, plan) -> dict:
    return api.get(f"{PLANS}/{plan['id']}").json()


def _items_state(items, protection, test=T.NONE, **fields):
    ProtectedItem.objects.filter(pk__in=[i.pk for i in items]).update(
        protection_state=protection, test_failover_state=test, **fields)


@pytest.mark.parametrize(("change", "state", "problem"), [
    (lambda items: None, "READY", None),
    (lambda items: _items_state(items[:1], P.INITIAL_REPLICATION, last_recovery_point_at=None), "NOT_READY",
     "db-01 is initial replication in progress."),
    (lambda items: _items_state(items[1:2], P.RESYNC_REQUIRED), "NOT_READY", "app-01 is resynchronization required."),
    (lambda items: _items_state(items[:1], P.PROTECTED, last_recovery_point_at=None), "NOT_READY",
     "db-01 has no recovery point yet."),
    (lambda items: ProtectedItem.objects.filter(pk=items[2].pk).update(
        recovery_site=None, recovery_network=None, test_network=None), "NOT_READY", "web-01 has no recovery site."),
    (lambda items: _items_state(items[:1], P.PROTECTED, T.IN_PROGRESS), "TEST_FAILOVER_IN_PROGRESS", None),
    (lambda items: _items_state(items, P.PROTECTED, T.CLEANING_UP), "TEST_FAILOVER_IN_PROGRESS", None),
    (lambda items: _items_state(items, P.PROTECTED, T.SUCCEEDED), "TEST_FAILOVER_CLEANUP_PENDING", None),
    (lambda items: _items_state(items[:2], P.FAILOVER_IN_PROGRESS), "FAILOVER_IN_PROGRESS", None),
    (lambda items: _items_state(items[:1], P.FAILED_OVER), "PARTIALLY_FAILED_OVER", None),
    (lambda items: _items_state(items, P.FAILED_OVER), "FAILED_OVER", None),
    (lambda items: (_items_state(items[:1], P.FAILED_OVER), _items_state(items[1:], P.FAILOVER_COMMITTED)),
     "FAILED_OVER", None),
    (lambda items: _items_state(items, P.FAILOVER_COMMITTED), "FAILOVER_COMMITTED", None),
])
def test_every_state_of_a_plan_is_shown(api, plan, items, change, state, problem):
    change(items)
    shown = _state(api, plan)
    assert shown["state"] == state, shown
    if problem:
        assert problem in shown["problems"]
        assert any(problem in s["problems"] for s in shown["item_states"])
    else:
        assert shown["problems"] == []


def test_a_plan_for_app_consistent_points_says_which_items_have_none(api, plan, items):
    RecoveryPoint.objects.create(item=items[0], point_id="p-app", seq=1, time=items[0].last_recovery_point_at,
                                 type="app_consistent")
    shown = api.patch(f"{PLANS}/{plan['id']}", {"recovery_point_type": "latest_app_consistent"}, format="json").json()
    assert shown["state"] == "NOT_READY"
    assert shown["problems"] == ["app-01 has no app-consistent recovery point yet.",
                                 "web-01 has no app-consistent recovery point yet."]


def test_a_plan_made_empty_elsewhere_says_so(api, plan):
    RecoveryPlanGroup.items.through.objects.all().delete()  # as the admin site could
    assert _state(api, plan)["state"] == "EMPTY"


def test_the_plan_list_takes_the_same_queries_for_one_plan_or_many(api, vault, plan, items, site):
    def count():
        with CaptureQueriesContext(connection) as queries:
            response = api.get(PLANS, {"vault": vault.pk})
        assert response.status_code == 200
        return len(queries), response.json()["count"]

    one, n = count()
    assert n == 1
    more = protected_items(vault, names=("db-02", "app-02", "web-02", "db-03"), site=recovery_site(vault, "site-west"))
    for i, item in enumerate(more):
        body = _body(vault, items, site)
        body.update(name=f"plan-{i}", network_mappings=[], groups=[{"items": [str(item.pk)],
                    "actions": [{"phase": "PRE", "kind": "MANUAL", "name": "Look", "instructions": "Look."}]}])
        assert api.post(PLANS, body, format="json").status_code == 201
    many, n = count()
    assert n == 5 and many == one
