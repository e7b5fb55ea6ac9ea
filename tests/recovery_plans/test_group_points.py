"""Recovery plans and replication groups: a plan keeps a group's members in one plan group
(a 400 that changes nothing otherwise), and a run fails them over to the group's newest
complete shared point (a 400 when there is none)."""
from __future__ import annotations

import pytest
from django.urls import reverse

from recovery_plans import services
from recovery_plans.models import RecoveryPlan
from recovery_plans.run_models import RecoveryPlanRun
from replication.choices import GroupPointState
from replication.groups import replication_group_create
from replication.models import GroupRecoveryPoint
from tests.factories import RecoveryPointFactory
from tests.recovery_plans.plan_data import protected_items, recovery_site

PLANS = "/api/v1/replicationRecoveryPlans"


@pytest.mark.django_db
def test_a_plan_keeps_a_replication_groups_members_together(api, client, admin_user, vault):
    db, app, web = protected_items(vault, site=recovery_site(vault))
    replication_group_create(vault=vault, name="shop", items=[db, app])
    client.force_login(admin_user)
    page = client.get(reverse("portal:item-detail", args=[db.pk])).content.decode()
    assert "<dt>Replication group</dt><dd>shop</dd>" in page
    r = api.post(f"{PLANS}/", {"vault": vault.pk, "name": "split", "groups": [
        {"name": "Data", "items": [str(db.pk)]}, {"name": "Front", "items": [str(app.pk), str(web.pk)]},
    ]}, format="json")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "The members of the replication group shop must be in one group of the plan (they fail over together, to "
        "one shared recovery point): 'app-01' in Front, 'db-01' in Data.")
    assert not RecoveryPlan.objects.exists()

    r = api.post(f"{PLANS}/", {"vault": vault.pk, "name": "together", "groups": [
        {"name": "Data", "items": [str(db.pk), str(app.pk)]}, {"name": "Front", "items": [str(web.pk)]},
    ]}, format="json")
    assert r.status_code == 201, r.content
    plan = RecoveryPlan.objects.get(pk=r.data["id"])
    data, front = plan.groups.order_by("order")
    # Moving one member away from the other is refused too, and changes nothing.
    with pytest.raises(Exception, match="must be in one group of the plan"):
        services.recovery_plan_item_move(plan=plan, item=app, group=front)
    assert set(data.items.values_list("pk", flat=True)) == {db.pk, app.pk}


@pytest.mark.django_db
def test_a_run_uses_the_newest_complete_group_point(api, vault):
    db, app, web = protected_items(vault, site=recovery_site(vault))
    group = replication_group_create(vault=vault, name="shop", items=[db, app])
    r = api.post(f"{PLANS}/", {"vault": vault.pk, "name": "p", "groups": [
        {"name": "All", "items": [str(db.pk), str(app.pk), str(web.pk)]},
    ]}, format="json")
    plan = r.data["id"]
    for item in (db, app, web):
        RecoveryPointFactory(item=item)
    # No shared point yet: a 400, nothing started.
    r = api.post(f"{PLANS}/{plan}/testFailover", {}, format="json")
    assert r.status_code == 400 and "shop has no complete shared recovery point yet" in r.json()["error"]["message"]
    assert not RecoveryPlanRun.objects.exists()

    members = [str(db.pk), str(app.pk)]
    complete = GroupRecoveryPoint.objects.create(group=group, members=members, state=GroupPointState.RELEASED)
    shares = {str(i.pk): RecoveryPointFactory(item=i, group_point=complete) for i in (db, app)}
    # Newer ones that are not complete: a member's point missing, an abandoned round.
    partial = GroupRecoveryPoint.objects.create(group=group, members=members, state=GroupPointState.RELEASED)
    RecoveryPointFactory(item=db, group_point=partial)
    abandoned = GroupRecoveryPoint.objects.create(group=group, members=members, state=GroupPointState.ABANDONED)
    RecoveryPointFactory(item=db, group_point=abandoned)
    RecoveryPointFactory(item=app, group_point=abandoned)
    for item in (db, app, web):
        RecoveryPointFactory(item=item)  # and newer points of each item alone

    r = api.post(f"{PLANS}/{plan}/testFailover", {}, format="json")
    assert r.status_code == 202, r.content
    run = RecoveryPlanRun.objects.get()
    assert run.options["groupPoints"] == {str(group.pk): {
        "id": str(complete.pk), "points": {k: str(p.pk) for k, p in shares.items()}}}
