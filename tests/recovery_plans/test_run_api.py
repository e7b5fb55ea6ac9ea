"""Running recovery plans through the API: refusals (400 / 409 with a sentence, nothing
changed), a manual pause that holds no worker, and the script runner."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.choices import JobState
from core.models import Job
from recovery_plans.run_models import RecoveryPlanRun
from recovery_plans.scripts import OUTPUT_KEEP_BYTES, script_run
from replication.choices import TestFailoverState as T
from replication.models import ProtectedItem
from tests.conftest import wait_for
from tests.factories import RecoveryPointFactory
from tests.recovery_plans.plan_data import protected_items, recovery_site
from vault.models import RecoveryNetwork

PLANS = "/api/v1/replicationRecoveryPlans"


def _plan(api, vault, items, *, actions=(), name="plan"):
    r = api.post(f"{PLANS}/", {"vault": vault.pk, "name": name, "groups": [
        {"name": "First", "items": [str(i.pk) for i in items], "actions": list(actions)},
    ]}, format="json")
    assert r.status_code == 201, r.content
    return r.data["id"]


def _nothing_started():
    return not RecoveryPlanRun.objects.exists() and not Job.objects.exists()


@pytest.mark.django_db
def test_refusals_are_sentences_and_change_nothing(api, vault):
    site = recovery_site(vault)
    items = protected_items(vault, names=("db-01", "web-01"), site=site)
    plan = _plan(api, vault, items)

    r = api.post(f"{PLANS}/{plan}/testFailoverCleanup", {}, format="json")
    assert r.status_code == 409
    assert r.json()["error"]["message"] == (
        "Cannot start a cleanup test failover of the plan plan: db-01 has no test failover to clean up (none); "
        "web-01 has no test failover to clean up (none).")
    assert api.post(f"{PLANS}/{plan}/failoverCommit").status_code == 409

    # No recovery point yet: a 400 naming the item.
    r = api.post(f"{PLANS}/{plan}/testFailover", {}, format="json")
    assert r.status_code == 400 and "'db-01' has no recovery point yet" in r.json()["error"]["message"]
    for item in items:
        RecoveryPointFactory(item=item)
    r = api.post(f"{PLANS}/{plan}/testFailover", {"recoveryPoint": "custom"}, format="json")
    assert r.status_code == 400 and "'custom' is not a recovery point rule for a plan" in r.json()["error"]["message"]
    r = api.post(f"{PLANS}/{plan}/testFailover", {"network": "recovery-net"}, format="json")
    assert r.status_code == 400 and "'recovery-net' is a recovery network" in r.json()["error"]["message"]
    # The recovery site has no test network: a 400 that says where to add one.
    RecoveryNetwork.objects.filter(site=site, purpose="TEST").delete()
    r = api.post(f"{PLANS}/{plan}/testFailover", {}, format="json")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("db-01 has no test network to go on: add one to the recovery site "
                                            "site-east or map one in the plan.")
    assert _nothing_started()
    assert {i.test_failover_state for i in ProtectedItem.objects.all()} == {T.NONE}

    # Nothing to resume, cancel, retry or continue.
    for control in ("resume", "cancel", "retry", "continue"):
        r = api.post(f"{PLANS}/{plan}/{control}")
        assert r.status_code == 409 and "has never run" in r.json()["error"]["message"], control


@pytest.mark.django_db
def test_a_second_run_of_a_running_plan_is_a_409(api, vault):
    """(The jobs' messages are sent on commit, which a test in a transaction never reaches.)"""
    site = recovery_site(vault)
    items = protected_items(vault, names=("db-01",), site=site)
    RecoveryPointFactory(item=items[0])
    plan = _plan(api, vault, items,
                 actions=[{"phase": "PRE", "kind": "MANUAL", "name": "Go", "instructions": "Say go."}])
    r = api.post(f"{PLANS}/{plan}/plannedFailover", {}, format="json")
    assert r.status_code == 202, r.content
    run = RecoveryPlanRun.objects.get()
    assert (run.state, str(run.job_id), run.operation) == ("NOT_STARTED", r.data["id"], "plannedFailover")
    assert r.data["steps"][0]["name"] == "Group 1 (First): manual action before: Go"
    r = api.post(f"{PLANS}/{plan}/unplannedFailover", {}, format="json")
    assert r.status_code == 409
    assert r.json()["error"]["message"] == ("The recovery plan plan is already running a planned failover "
                                            "(not started); wait for it to end or cancel it.")
    r = api.post(f"{PLANS}/{plan}/resume")
    assert r.status_code == 409 and "not waiting for a manual action" in r.json()["error"]["message"]
    r = api.post(f"{PLANS}/{plan}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    assert Job.objects.get(pk=run.job_id).state == JobState.CANCELLED
    assert api.get(f"{PLANS}/{plan}/runs").json()[0]["state"] == "CANCELLED"


def test_manual_pauses_hold_no_worker(celery_worker, api, vault):
    """The test worker has 4 threads: 6 plans wait at a manual action at once, and jobs that
    come after them still run."""
    site = recovery_site(vault)
    items = protected_items(vault, names=[f"vm-{n}" for n in range(7)], site=site)
    plans = []
    for n, item in enumerate(items[:6]):
        plans.append(_plan(api, vault, [item], name=f"waits-{n}", actions=[
            {"phase": "PRE", "kind": "MANUAL", "name": "Check", "instructions": f"Check number {n}."}]))
    for plan in plans:
        assert api.post(f"{PLANS}/{plan}/plannedFailover", {}, format="json").status_code == 202
    wait_for(lambda: RecoveryPlanRun.objects.filter(state="WAITING_FOR_ACTION").count() == 6, timeout=60,
             message="six plans waiting")
    wait_for(lambda: Job.objects.filter(state=JobState.WAITING).count() == 6, timeout=30, message="six jobs waiting")
    shown = api.get(f"{PLANS}/{plans[0]}/runs").json()[0]
    assert shown["waiting_for"] == ("Group 1 (First): manual action 'Check': Check number 0. "
                                    "Resume the plan when it is done.")
    # Another plan still runs: its script runs, then its item cannot start (the item's own
    # service refuses a machine without a vCenter), and the run says so.
    last = _plan(api, vault, [items[6]], name="runs", actions=[
        {"phase": "PRE", "kind": "SCRIPT", "name": "Hello", "script": "echo hello"}])
    r = api.post(f"{PLANS}/{last}/plannedFailover", {}, format="json")
    assert r.status_code == 202
    run = wait_for(lambda: RecoveryPlanRun.objects.filter(plan_id=last, state="FAILED").first(), timeout=60,
                   message="the other plan ran")
    assert "vm-6 failed: it could not start: A planned failover shuts 'vm-6' down through its vCenter" in run.message
    job = Job.objects.get(pk=r.data["id"])
    assert job.steps[0]["script"]["stdout"] == "hello\n"
    assert RecoveryPlanRun.objects.filter(state="WAITING_FOR_ACTION").count() == 6
    for plan in plans:
        assert api.post(f"{PLANS}/{plan}/cancel").json()["state"] == "CANCELLED"
    assert not Job.objects.filter(state__in=JobState.ACTIVE).exists()


def test_a_script_is_killed_at_its_timeout_with_what_it_printed(tmp_path):
    started = tmp_path / "child.pid"
    out = script_run(command=f"echo before; (sleep 60 & echo $! > {started}; wait)", timeout=1)
    assert out["timed_out"] and out["exit_code"] is None and out["stdout"] == "before\n"
    # The script's own children went with it (gone, or a zombie waiting to be reaped).
    stat = Path(f"/proc/{int(started.read_text())}/stat")

    def gone() -> bool:
        try:
            text = stat.read_text()
        except FileNotFoundError:
            return True
        return "(sleep)" not in text or text.split(")")[1].split()[0] in ("Z", "X")

    wait_for(gone, timeout=10, message="the script's child killed")


def test_a_script_keeps_the_end_of_a_long_output_and_its_exit_code():
    out = script_run(command="head -c 100000 /dev/zero | tr '\\0' x; echo; echo last line >&2; exit 7", timeout=30)
    assert out["exit_code"] == 7 and not out["timed_out"]
    assert out["stdout"].startswith(f"[... the first {100001 - OUTPUT_KEEP_BYTES} bytes are not kept ...]\n")
    assert len(out["stdout"]) < OUTPUT_KEEP_BYTES + 100 and out["stderr"] == "last line\n"


@pytest.mark.django_db
def test_the_plan_page_runs_the_plan_and_shows_the_tree(client, admin_user, vault):
    site = recovery_site(vault)
    items = protected_items(vault, names=("db-01", "web-01"), site=site)
    for item in items:
        RecoveryPointFactory(item=item)
    from recovery_plans import services

    plan = services.recovery_plan_create(vault=vault, name="tiers", groups=[
        {"name": "Databases", "items": [items[0]], "actions": [
            {"phase": "POST", "kind": "SCRIPT", "name": "Update DNS", "script": "/opt/dr/dns.sh", "timeout_seconds": 60}]},
        {"name": "Web", "items": [items[1]]},
    ])
    client.force_login(admin_user)
    page = client.get(f"/plans/{plan.pk}/").content.decode()
    assert "Run the plan" in page and ">Test failover</button>" in page and ">Planned failover</button>" in page
    assert ">Commit failover</button>" not in page  # nothing is failed over
    # A real failover or a commit needs its box ticked in the portal; without it nothing starts.
    r = client.post(f"/plans/{plan.pk}/run/planned-failover/", follow=True)
    assert "Tick the confirmation to start a planned failover of tiers; nothing was started." in r.content.decode()
    assert not RecoveryPlanRun.objects.exists()
    assert 'name="confirm" required' in page and "Latest: the newest recovery point</option>" in page
    r = client.post(f"/plans/{plan.pk}/run/failover-commit/", {"confirm": "on"}, follow=True)
    assert "Cannot start a commit failover of the plan tiers: db-01 is protected, not failed over" in r.content.decode()
    assert not RecoveryPlanRun.objects.exists()
    r = client.post(f"/plans/{plan.pk}/run/test-failover/", {"recoveryPoint": "latest"})
    assert r.status_code == 302 and r["Location"].endswith(f"/plans/{plan.pk}/#plan-run")
    run = RecoveryPlanRun.objects.get()
    page = client.get(f"/plans/{plan.pk}/").content.decode()
    assert 'data-state="NOT_STARTED"' in page and "Cancel the run" in page and ">Test failover</button>" not in page
    assert "Group 1 (Databases): script after: Update DNS" in page and "Group 2 (Web): test failover 1 item" in page
    panel = client.get(f"/plans/{plan.pk}/run/", HTTP_HX_REQUEST="true")
    assert panel.status_code == 200 and 'hx-trigger="every 2s"' in panel.content.decode()
    job_page = client.get(f"/jobs/{run.job_id}/").content.decode()
    assert "Group 1 (Databases): test failover 1 item" in job_page and 'id="plan-run-tree"' in job_page
    assert client.post(f"/plans/{plan.pk}/run/cancel/").status_code == 302
    run.refresh_from_db()
    assert run.state == "CANCELLED"
    panel = client.get(f"/plans/{plan.pk}/run/", HTTP_HX_REQUEST="true")
    assert panel.status_code == 286 and "Cancelled by an administrator" in panel.content.decode()
