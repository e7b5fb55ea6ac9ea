"""The plan editor in the portal: every edit is an HTMX post that answers with the editor
(the refused ones with the reason, 400 / 409, and nothing changed); plain posts redirect."""
from __future__ import annotations

import pytest
from django.urls import reverse

from recovery_plans import services
from recovery_plans.models import RecoveryPlan, RecoveryPlanAction, RecoveryPlanGroup
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem
from tests.conftest import grant_role
from tests.recovery_plans.plan_data import protected_items, recovery_site, stranger_item
from tests.recovery_plans.test_plan_api import _snapshot

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "plan-editor"}


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
def site(vault):
    return recovery_site(vault)


@pytest.fixture
def items(vault, site):
    return protected_items(vault, names=("db-01", "app-01", "web-01", "web-02"), site=site)


@pytest.fixture
def plan(vault, items):
    return services.recovery_plan_create(
        vault=vault, name="three-tier", groups=[
            {"name": "Databases", "items": [items[0]],
             "actions": [{"phase": "PRE", "kind": "MANUAL", "name": "Stop writes", "instructions": "Stop the app."}]},
            {"name": "Web", "items": [items[2]]},
        ],
    )


def _edit(client, plan, operation, data, *, htmx=True):
    return client.post(reverse("portal:plan-edit", args=[plan.pk, operation]), data, **(HTMX if htmx else {}))


def _editor(response, status=200) -> str:
    assert response.status_code == status, response.content[:300]
    html = response.content.decode()
    assert not html.lstrip().startswith("<!doctype"), "an HTMX edit answers with the editor only"
    assert html.lstrip().startswith('<div id="plan-editor">')
    return html


def _groups(plan) -> list[tuple[int, str, list[str]]]:
    return [(g.order, g.name, sorted(i.name for i in g.items.all())) for g in plan.groups.order_by("order")]


def test_plan_list_shows_each_plan_with_its_state(admin_client, plan, items):
    ProtectedItem.objects.filter(pk=items[2].pk).update(protection_state=P.RESYNC_REQUIRED)
    html = admin_client.get(reverse("portal:plans")).content.decode()
    assert reverse("portal:plan-detail", args=[plan.pk]) in html
    assert "Databases (1 item) → Web (1 item)" in html
    assert 'data-state="NOT_READY"' in html and "Not ready to fail over" in html
    assert reverse("portal:plan-create") in html


def test_create_a_plan_in_the_portal(admin_client, vault, items):
    response = admin_client.post(reverse("portal:plan-create"), {
        "name": "web-tier", "description": "", "recovery_point_type": "latest_app_consistent",
        "group_name": "Databases", "items": [items[0].pk, items[1].pk],
    })
    plan = RecoveryPlan.objects.get(name="web-tier")
    assert response.status_code == 302 and response["Location"] == reverse("portal:plan-detail", args=[plan.pk])
    assert plan.recovery_point_type == "latest_app_consistent"
    assert _groups(plan) == [(1, "Databases", ["app-01", "db-01"])]
    html = admin_client.get(response["Location"]).content.decode()
    assert "Group 1: Databases" in html and "db-01 has no app-consistent recovery point yet." in html


def test_create_refuses_an_empty_plan_and_a_taken_name(admin_client, vault, plan, items):
    before = _snapshot()
    response = admin_client.post(reverse("portal:plan-create"), {"name": "empty", "recovery_point_type": "latest"})
    assert response.status_code == 400
    assert "A recovery plan needs at least one protected item" in response.content.decode()
    response = admin_client.post(reverse("portal:plan-create"), {
        "name": "three-tier", "recovery_point_type": "latest", "items": [items[1].pk]})
    assert response.status_code == 409
    assert "A recovery plan named &#x27;three-tier&#x27; already exists in this vault." in response.content.decode()
    assert _snapshot() == before


def test_plan_page_shows_groups_items_actions_and_defaults(admin_client, plan, items):
    html = admin_client.get(reverse("portal:plan-detail", args=[plan.pk])).content.decode()
    for text in ["three-tier", "Ready to fail over", "Group 1: Databases", "Group 2: Web", "db-01", "web-01",
                 "manual action <em>Stop writes</em>", "Stop the app.", "site-east: recovery network",
                 "Add protected items to group 1", "app-01", "Add an action to group 2", "Delete this plan",
                 'name="recovery_point_type"']:
        assert text in html, text


def test_the_state_panel_polls_alone(admin_client, plan, items):
    ProtectedItem.objects.filter(pk=items[0].pk).update(test_failover_state="IN_PROGRESS")
    response = admin_client.get(reverse("portal:plan-detail", args=[plan.pk]),
                                HTTP_HX_REQUEST="true", HTTP_HX_TARGET="plan-status")
    html = response.content.decode()
    assert html.lstrip().startswith('<section class="card" id="plan-status"')
    assert "Test failover in progress" in html and "plan-group" not in html


def test_groups_add_rename_reorder_remove(admin_client, plan):
    html = _editor(_edit(admin_client, plan, "add-group", {"name": "Application"}))
    assert "Group 3: Application" in html
    app = plan.groups.get(name="Application")
    _editor(_edit(admin_client, plan, "move-group", {"group": app.pk, "position": 2}))
    assert _groups(plan) == [(1, "Databases", ["db-01"]), (2, "Application", []), (3, "Web", ["web-01"])]
    _editor(_edit(admin_client, plan, "rename-group", {"group": app.pk, "name": "App servers"}))
    web = plan.groups.get(name="Web")
    _editor(_edit(admin_client, plan, "move-group", {"group": web.pk, "position": 1}))
    assert _groups(plan) == [(1, "Web", ["web-01"]), (2, "Databases", ["db-01"]), (3, "App servers", [])]
    _editor(_edit(admin_client, plan, "remove-group", {"group": app.pk}))
    assert _groups(plan) == [(1, "Web", ["web-01"]), (2, "Databases", ["db-01"])]


def test_items_add_move_remove(admin_client, plan, items):
    databases, web = plan.groups.order_by("order")
    html = _editor(_edit(admin_client, plan, "add-items", {"group": web.pk, "items": [items[1].pk, items[3].pk]}))
    assert "app-01" in html
    _editor(_edit(admin_client, plan, "move-item", {"group": databases.pk, "item": items[1].pk}))
    assert _groups(plan) == [(1, "Databases", ["app-01", "db-01"]), (2, "Web", ["web-01", "web-02"])]
    _editor(_edit(admin_client, plan, "remove-item", {"item": items[3].pk}))
    assert _groups(plan) == [(1, "Databases", ["app-01", "db-01"]), (2, "Web", ["web-01"])]
    assert ProtectedItem.objects.filter(pk=items[3].pk).exists()


def test_actions_add_and_remove(admin_client, plan):
    databases, web = plan.groups.order_by("order")
    html = _editor(_edit(admin_client, plan, "add-action", {
        "group": web.pk, "phase": "POST", "kind": "SCRIPT", "name": "Update DNS", "script": "/opt/dr/dns.sh",
        "timeout_seconds": "90", "instructions": "ignored for a script"}))
    assert "<code>/opt/dr/dns.sh</code>" in html and "(timeout 90 s)" in html
    action = web.actions.get()
    assert (action.phase, action.kind, action.script, action.timeout_seconds, action.instructions) == (
        "POST", "SCRIPT", "/opt/dr/dns.sh", 90, "")
    _edit(admin_client, plan, "add-action", {"group": databases.pk, "phase": "PRE", "kind": "MANUAL",
                                             "name": "Call the DBA", "instructions": "Ask for a go."})
    assert list(databases.actions.values_list("name", "order")) == [("Stop writes", 1), ("Call the DBA", 2)]
    _editor(_edit(admin_client, plan, "remove-action", {"action": action.pk}))
    assert not web.actions.exists()


def test_settings_and_network_mapping(admin_client, plan, site):
    _editor(_edit(admin_client, plan, "settings", {"name": "three-tier v2", "description": "Nightly drill",
                                                   "recovery_point_type": "latest_processed"}))
    plan.refresh_from_db()
    assert (plan.name, plan.description, plan.recovery_point_type) == ("three-tier v2", "Nightly drill", "latest_processed")
    dmz, lab = site.networks.get(name="dmz-net"), site.networks.get(name="lab-net")
    html = _editor(_edit(admin_client, plan, "network-mapping",
                         {f"recovery_network_{site.pk}": dmz.pk, f"test_network_{site.pk}": lab.pk}))
    assert [(m.recovery_network, m.test_network) for m in plan.network_mappings.all()] == [(dmz, lab)]
    assert "<td>dmz-net</td><td>lab-net</td>" in html


def _action(group, **fields):
    return {"group": group.pk, "phase": "PRE", "kind": "SCRIPT", "name": "Run", "script": "/bin/true",
            "timeout_seconds": "60", **fields}


@pytest.mark.parametrize(("operation", "data", "status", "message"), [
    ("add-action", lambda p, i: _action(p.groups.first(), script=""), 400,
     "&#x27;Run&#x27; in Databases: A script action needs the command to run."),
    ("add-action", lambda p, i: _action(p.groups.first(), timeout_seconds="0"), 400,
     "A script&#x27;s timeout is at least 1 second."),
    ("add-action", lambda p, i: _action(p.groups.first(), timeout_seconds="9000"), 400,
     "A script&#x27;s timeout is at most 7200 seconds (two hours)."),
    ("add-action", lambda p, i: _action(p.groups.first(), kind="MANUAL", instructions=""), 400,
     "A manual action needs instructions for the admin."),
    ("add-items", lambda p, i: {"group": p.groups.last().pk, "items": [i[0].pk]}, 400,
     "&#x27;db-01&#x27; is already in Databases of this plan; move it instead of adding it twice."),
    ("add-items", lambda p, i: {"group": p.groups.last().pk, "items": [stranger_item().pk]}, 400,
     "&#x27;elsewhere-01&#x27; belongs to another vault"),
    ("add-items", lambda p, i: {"group": p.groups.last().pk}, 400, "Choose at least one protected item to add."),
    ("remove-group", lambda p, i: {"group": p.groups.first().pk}, 400,
     "Databases still holds 1 item; move or remove it first."),
    ("remove-item", lambda p, i: {"item": i[1].pk}, 400, "&#x27;app-01&#x27; is not in the plan three-tier."),
    ("move-group", lambda p, i: {"group": p.groups.first().pk, "position": 5}, 400,
     "There is no position 5 in a plan of 2 groups."),
    ("settings", lambda p, i: {"name": "other", "recovery_point_type": "custom"}, 400, "Default recovery point"),
    ("settings", lambda p, i: {"name": "taken", "recovery_point_type": "latest"}, 409,
     "A recovery plan named &#x27;taken&#x27; already exists in this vault."),
])
def test_a_refused_edit_shows_why_and_changes_nothing(admin_client, vault, plan, items, operation, data, status, message):
    services.recovery_plan_create(vault=vault, name="taken", groups=[{"items": [items[3]]}])
    body = data(plan, items)
    before = _snapshot()
    html = _editor(_edit(admin_client, plan, operation, body), status)
    assert 'id="plan-error"' in html and message in html, html[:600]
    assert _snapshot() == before


def test_the_last_item_cannot_be_removed(admin_client, vault, items):
    plan = services.recovery_plan_create(vault=vault, name="solo", groups=[{"items": [items[0]]}])
    html = _editor(_edit(admin_client, plan, "remove-item", {"item": items[0].pk}), 400)
    assert "&#x27;db-01&#x27; is the plan&#x27;s only item and a plan needs at least one; delete the plan instead." in html
    assert _groups(plan) == [(1, "", ["db-01"])]


def test_a_plain_post_redirects_with_the_message(admin_client, plan):
    response = _edit(admin_client, plan, "remove-group", {"group": plan.groups.first().pk}, htmx=False)
    assert response.status_code == 302 and response["Location"] == reverse("portal:plan-detail", args=[plan.pk])
    html = admin_client.get(response["Location"]).content.decode()
    assert "Databases still holds 1 item; move or remove it first." in html


def test_delete_needs_the_plans_name(admin_client, plan, items):
    url = reverse("portal:plan-delete", args=[plan.pk])
    assert admin_client.post(url, {"confirm_name": "three"}).status_code == 302
    assert RecoveryPlan.objects.filter(pk=plan.pk).exists()
    response = admin_client.post(url, {"confirm_name": "three-tier"})
    assert response["Location"] == reverse("portal:plans")
    assert not RecoveryPlan.objects.exists() and not RecoveryPlanGroup.objects.exists()
    assert not RecoveryPlanAction.objects.exists() and ProtectedItem.objects.count() == 4


def test_a_viewer_sees_the_plan_but_cannot_edit(viewer_client, plan):
    html = viewer_client.get(reverse("portal:plan-detail", args=[plan.pk])).content.decode()
    assert "Group 1: Databases" in html and "Add group" not in html and "Delete this plan" not in html
    before = _snapshot()
    assert _edit(viewer_client, plan, "add-group", {"name": "x"}).status_code == 403
    assert viewer_client.post(reverse("portal:plan-delete", args=[plan.pk]), {"confirm_name": "three-tier"}).status_code == 403
    assert viewer_client.get(reverse("portal:plan-create")).status_code == 403
    assert _snapshot() == before


def test_an_unknown_edit_is_not_found(admin_client, plan):
    assert _edit(admin_client, plan, "launch", {}).status_code == 404
