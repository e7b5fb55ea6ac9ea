"""Recovery plans run end to end on real parts: a real Celery worker, a real process server
process, the simulated VMware site writing through its real agents, the simulated recovery
site. Every run that recovers VMs ends in a byte comparison of their disks with the source's
bytes at the point."""
from __future__ import annotations

import pytest

from core.choices import JobState
from core.models import Job
from recovery_plans.models import RecoveredVm, RecoveryPlan
from recovery_plans.run_models import RecoveryPlanRun
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import bookmarked_point, wait_for
from tests.e2e.harness import MiB, Site, process_server
from tests.recovery_plans.test_jobs import _source_shas, _vm_shas
from vault import services as vault_services

pytestmark = pytest.mark.timeout(1200)

ITEMS = "/api/v1/replicationProtectedItems"
PLANS = "/api/v1/replicationRecoveryPlans"
WORKLOAD = {"rate_bytes_per_s": MiB // 2, "write_size": 16 * 1024, "pattern": "hotspot"}
VMS = [
    {"name": "db", "disks": [4 * MiB, 2 * MiB], "workload": WORKLOAD},
    {"name": "app", "disks": [4 * MiB], "workload": WORKLOAD},
    {"name": "web", "disks": [4 * MiB], "workload": WORKLOAD},
]


@pytest.fixture
def site(tmp_path, live_server, celery_worker):
    from django.test import override_settings

    s = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS)
    drain = override_settings(LIFEBOAT_FAILOVER_DRAIN_TIMEOUT=120)
    drain.enable()
    yield s
    drain.disable()
    s.close()


def _job(job_id, timeout=240) -> Job:
    return wait_for(lambda: Job.objects.filter(pk=job_id, state__in=JobState.TERMINAL).first(), timeout=timeout,
                    message=f"job {job_id}")


def _run(plan: RecoveryPlan, *states: str, timeout=300) -> RecoveryPlanRun:
    def look():
        run = RecoveryPlanRun.objects.filter(plan=plan).select_related("job").order_by("-created_at").first()
        return run if run is not None and run.state in states else None

    return wait_for(look, timeout=timeout, interval=0.3, message=f"plan run in {states}")


def _protect_all(site: Site, api, recovery) -> dict[str, ProtectedItem]:
    """Replicate every VM until each is protected."""
    jobs = []
    for machine in site.vault.machines.order_by("name"):
        r = api.post(f"{ITEMS}/", {"vault": site.vault.pk, "machine": machine.pk, "policy": site.policy.pk,
                                   "process_server": site.ps.pk, "recovery_site": recovery.pk}, format="json")
        assert r.status_code == 202, r.content
        jobs.append(r.data["id"])
    for job_id in jobs:
        assert _job(job_id).state == JobState.SUCCEEDED
    items = {i.name: i for i in ProtectedItem.objects.filter(vault=site.vault)}
    for item in items.values():
        wait_for(lambda item=item: ProtectedItem.objects.get(pk=item.pk).protection_state == P.PROTECTED, timeout=120,
                 message=f"{item.name} protected")
    return items


def _app_points(site: Site, items: dict[str, ProtectedItem], writer) -> dict[str, dict[int, str]]:
    """Stop the writes, note each source's bytes, cut an app-consistent point of each there."""
    from replication.scheduling import protected_item_app_consistent_snapshot

    writer.set()
    writer.thread.join(timeout=10)
    shas = {}
    for name, item in items.items():
        shas[name] = _source_shas(site, item)
        bookmark = protected_item_app_consistent_snapshot(item=ProtectedItem.objects.get(pk=item.pk))
        assert bookmarked_point(item, bookmark, timeout=90, message=f"{name} app-consistent point").type == "app_consistent"
    return shas


def _plan(api, site, items, groups, name="three-tier") -> RecoveryPlan:
    r = api.post(f"{PLANS}/", {"vault": site.vault.pk, "name": name, "recovery_point_type": "latest_app_consistent",
                               "groups": groups}, format="json")
    assert r.status_code == 201, r.content
    return RecoveryPlan.objects.get(pk=r.data["id"])


def _vms(items, kind: str) -> dict[str, RecoveredVm]:
    return {name: RecoveredVm.objects.get(item=item, kind=kind, removed_at__isnull=True) for name, item in items.items()}


def test_three_group_plan_drilled_resumed_cleaned_up_then_failed_over_and_committed(site, api, client, admin_user):
    recovery = vault_services.recovery_site_create(
        vault=site.vault, name="recovery-site", host=str(site.tmp / "recovery"),
        networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")],
    )
    writer = site.start_workload()
    client.force_login(admin_user)
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        items = _protect_all(site, api, recovery)
        shas = _app_points(site, items, writer)
        plan = _plan(api, site, items, [
            {"name": "Databases", "items": [str(items["db"].pk)],
             "actions": [{"phase": "POST", "kind": "SCRIPT", "name": "Update DNS", "timeout_seconds": 60,
                          "script": "echo \"dns updated for $LIFEBOAT_PLAN group $LIFEBOAT_GROUP\"; echo 'a warning' >&2"}]},
            {"name": "Application", "items": [str(items["app"].pk)],
             "actions": [{"phase": "PRE", "kind": "MANUAL", "name": "Check the database",
                          "instructions": "Log in to db-test and check the last orders are there."}]},
            {"name": "Web", "items": [str(items["web"].pk)]},
        ])

        # --- the drill: group 1, its script, then the pause before group 2.
        r = api.post(f"{PLANS}/{plan.pk}/testFailover", {}, format="json")
        assert r.status_code == 202, r.content
        assert r["Location"].endswith(f"/replicationJobs/{r.data['id']}/")
        assert r.data["type"] == "PLAN_TEST_FAILOVER"
        again = api.post(f"{PLANS}/{plan.pk}/testFailover", {}, format="json")
        assert again.status_code == 409 and "already running" in again.json()["error"]["message"]
        run = _run(plan, "WAITING_FOR_ACTION")
        plan_job = wait_for(lambda: Job.objects.filter(pk=r.data["id"], state=JobState.WAITING).first(), timeout=30,
                            message="plan job waiting")
        assert "Log in to db-test" in plan_job.waiting_for
        shown = api.get(r["Location"]).json()
        assert [s["state"] for s in shown["steps"]] == ["SUCCEEDED", "SUCCEEDED", "WAITING", "PENDING", "PENDING"]
        script = shown["steps"][1]["script"]
        assert script["exit_code"] == 0 and script["stdout"] == "dns updated for three-tier group 1\n"
        assert script["stderr"] == "a warning\n"
        assert len(shown["children"]) == 1
        child = api.get(f"/api/v1/replicationJobs/{shown['children'][0]}/").json()
        assert (child["type"], child["state"], child["parent"]) == ("TEST_FAILOVER", "SUCCEEDED", r.data["id"])
        assert ProtectedItem.objects.get(pk=items["app"].pk).test_failover_state == "NONE"  # group 2 waits
        # The plan page shows the instructions, the script's output and a Resume button.
        page = client.get(f"/plans/{plan.pk}/").content.decode()
        assert "Log in to db-test and check the last orders are there." in page
        assert "dns updated for three-tier group 1" in page and ">Resume</button>" in page
        job_page = client.get(f"/jobs/{plan_job.pk}/").content.decode()
        assert "Group 1 (Databases)" in job_page and "dns updated for three-tier group 1" in job_page

        # --- Resume in the portal: groups 2 and 3 run, each after the one before.
        assert client.post(f"/plans/{plan.pk}/run/resume/").status_code == 302
        run = _run(plan, "SUCCEEDED", "FAILED")
        assert run.state == "SUCCEEDED", run.message
        plan_job = _job(plan_job.pk)
        assert plan_job.state == JobState.SUCCEEDED and plan_job.progress == 100
        children = list(Job.objects.filter(parent=plan_job).order_by("created_at"))
        assert [c.target_name for c in children] == ["db", "app", "web"]
        assert all(c.state == JobState.SUCCEEDED for c in children)
        assert children[1].created_at > children[0].ended_at and children[2].created_at > children[1].ended_at
        test_vms = _vms(items, "TEST")
        for name, vm in test_vms.items():
            assert (vm.name, vm.network.name, vm.point_type) == (f"{name}-test", "test-net", "app_consistent")
            assert _vm_shas(vm) == shas[name], f"the test VM of {name} differs from the source at the point"

        # --- cleanup of the whole drill.
        r = api.post(f"{PLANS}/{plan.pk}/testFailoverCleanup", {"comments": "Drill passed."}, format="json")
        assert r.status_code == 202, r.content
        assert _run(plan, "SUCCEEDED", "FAILED").state == "SUCCEEDED"
        for vm in test_vms.values():
            vm.refresh_from_db()
            assert vm.removed_at is not None and vm.cleanup_notes == "Drill passed."
        with recovery.connector() as connector:
            assert not {v.vm_id for v in connector.list_vms()} & {vm.vm_id for vm in test_vms.values()}

        # --- planned failover (the manual action pauses it too), then commit.
        writer = site.start_workload()
        r = api.post(f"{PLANS}/{plan.pk}/plannedFailover", {}, format="json")
        assert r.status_code == 202, r.content
        _run(plan, "WAITING_FOR_ACTION")
        wait_for(lambda: Job.objects.filter(pk=r.data["id"], state=JobState.WAITING).exists(), timeout=30,
                 message="plan job waiting")
        resumed = api.post(f"{PLANS}/{plan.pk}/resume")
        assert resumed.status_code == 200, resumed.content
        assert api.post(f"{PLANS}/{plan.pk}/resume").status_code == 409  # nothing to resume any more
        run = _run(plan, "SUCCEEDED", "FAILED", timeout=600)
        assert run.state == "SUCCEEDED", run.message
        writer.set()
        writer.thread.join(timeout=10)
        for name, item in items.items():
            assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.FAILED_OVER
            assert site.site.get_vm(item.machine.instance_uuid).power_state == "poweredOff"
        failed_over = _vms(items, "FAILOVER")
        for name, vm in failed_over.items():
            assert _vm_shas(vm) == _source_shas(site, items[name]), f"{name} lost writes in the planned failover"

        r = api.post(f"{PLANS}/{plan.pk}/failoverCommit")
        assert r.status_code == 202, r.content
        assert _run(plan, "SUCCEEDED", "FAILED").state == "SUCCEEDED"
        assert api.post(f"{PLANS}/{plan.pk}/failoverCommit").status_code == 409
        for name, vm in failed_over.items():
            assert ProtectedItem.objects.get(pk=items[name].pk).protection_state == P.FAILOVER_COMMITTED
            assert _vm_shas(vm) == _source_shas(site, items[name])


def test_failing_script_failing_vm_retry_continue_and_cancel(site, api, tmp_path):
    from recovery_plans.jobs import test_vm_name
    from replication.dataplane.recovery import recovery_disks
    from replication.engine import applier_for

    recovery = vault_services.recovery_site_create(
        vault=site.vault, name="recovery-site", host=str(site.tmp / "recovery"),
        networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")],
    )
    marker = tmp_path / "script-ran-once"
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        items = _protect_all(site, api, recovery)
        shas = _app_points(site, items, writer)
        plan = _plan(api, site, items, [
            {"name": "Databases", "items": [str(items["db"].pk)],
             "actions": [{"phase": "POST", "kind": "SCRIPT", "name": "Check the database", "timeout_seconds": 30,
                          "script": f"if [ -f {marker} ]; then echo db ok; else touch {marker}; "
                                    "echo checking; echo 'db check: connection refused' >&2; exit 3; fi"}]},
            {"name": "Front", "items": [str(items["app"].pk), str(items["web"].pk)]},
            {"name": "Report", "items": [],
             "actions": [{"phase": "POST", "kind": "SCRIPT", "name": "Report", "script": "echo all up"}]},
        ])
        # A VM of web's test VM's name already exists at the recovery site: its recovery fails.
        point = RecoveryPoint.objects.filter(item=items["web"]).order_by("-seq").first()
        with recovery.connector() as connector:
            blocker = connector.create_vm(name=test_vm_name(items["web"]), network="test-net",
                                          disks=recovery_disks(applier_for(items["web"]), point.point_id))

        # --- the script fails: the plan stops there, with its output.
        r = api.post(f"{PLANS}/{plan.pk}/testFailover", {"recoveryPoint": "latest_app_consistent"}, format="json")
        assert r.status_code == 202, r.content
        run = _run(plan, "FAILED", "SUCCEEDED")
        assert run.state == "FAILED"
        assert "'Check the database' failed with exit code 3" in run.message
        assert "db check: connection refused" in run.message
        job = _job(r.data["id"])
        assert job.state == JobState.FAILED and "exit code 3" in job.error
        shown = api.get(f"/api/v1/replicationJobs/{job.pk}/").json()
        assert shown["steps"][1]["state"] == "FAILED"
        assert shown["steps"][1]["script"]["stderr"] == "db check: connection refused\n"
        assert shown["steps"][1]["script"]["stdout"] == "checking\n"
        assert [s["state"] for s in shown["steps"][2:]] == ["PENDING"] * 3
        assert {ProtectedItem.objects.get(pk=items[n].pk).test_failover_state for n in ("app", "web")} == {"NONE"}
        assert api.post(f"{PLANS}/{plan.pk}/testFailover", {}, format="json").status_code == 409  # db is drilled

        # --- retry: the script passes; group 2 runs; web fails, app finishes, group 3 waits.
        r = api.post(f"{PLANS}/{plan.pk}/retry")
        assert r.status_code == 202, r.content
        assert r.data["id"] != str(job.pk)
        run = _run(plan, "FAILED", "SUCCEEDED")
        assert run.state == "FAILED"
        assert "web failed:" in run.message and "already exists" in run.message and "app finished" in run.message
        assert run.items[str(items["app"].pk)]["state"] == "SUCCEEDED"
        assert run.items[str(items["web"].pk)]["state"] == "FAILED"
        retry_job = _job(r.data["id"])
        assert [s["state"] for s in retry_job.steps] == ["SUCCEEDED", "FAILED", "PENDING", "PENDING"]
        assert retry_job.steps[0]["script"]["stdout"] == "db ok\n"
        assert ProtectedItem.objects.get(pk=items["web"].pk).test_failover_state == "NONE"

        # --- the blocker gone, retry again: only web runs, then the last group.
        with recovery.connector() as connector:
            connector.destroy_vm(blocker.vm_id)
        r = api.post(f"{PLANS}/{plan.pk}/retry")
        assert r.status_code == 202, r.content
        run = _run(plan, "FAILED", "SUCCEEDED")
        assert run.state == "SUCCEEDED", run.message
        last = _job(r.data["id"])
        assert [c.target_name for c in Job.objects.filter(parent=last)] == ["web"]
        assert last.steps[-1]["script"]["stdout"] == "all up\n"
        assert api.post(f"{PLANS}/{plan.pk}/retry").status_code == 409  # nothing failed any more
        for name, vm in _vms(items, "TEST").items():
            assert _vm_shas(vm) == shas[name], f"the test VM of {name} differs from the source at the point"
        r = api.post(f"{PLANS}/{plan.pk}/testFailoverCleanup", {}, format="json")
        assert r.status_code == 202
        assert _run(plan, "SUCCEEDED", "FAILED").state == "SUCCEEDED"

        # --- continue: a failed script is left behind and the plan goes on.
        marker.unlink()
        r = api.post(f"{PLANS}/{plan.pk}/testFailover", {}, format="json")
        assert r.status_code == 202, r.content
        assert _run(plan, "FAILED", "SUCCEEDED").state == "FAILED"
        r = api.post(f"{PLANS}/{plan.pk}/continue")
        assert r.status_code == 202, r.content
        run = _run(plan, "FAILED", "SUCCEEDED")
        assert run.state == "SUCCEEDED", run.message
        assert [c.target_name for c in Job.objects.filter(parent=r.data["id"]).order_by("target_name")] == ["app", "web"]
        for name, vm in _vms(items, "TEST").items():
            assert _vm_shas(vm) == shas[name]
        r = api.post(f"{PLANS}/{plan.pk}/testFailoverCleanup", {}, format="json")
        assert _run(plan, "SUCCEEDED", "FAILED").state == "SUCCEEDED"

        # --- cancel at a manual action: group 1 was recovered, nothing after it starts.
        paused = _plan(api, site, items, [
            {"name": "Databases", "items": [str(items["db"].pk)],
             "actions": [{"phase": "POST", "kind": "MANUAL", "name": "Check", "instructions": "Check the database."}]},
            {"name": "Front", "items": [str(items["app"].pk), str(items["web"].pk)]},
        ], name="paused")
        r = api.post(f"{PLANS}/{paused.pk}/testFailover", {}, format="json")
        assert r.status_code == 202, r.content
        _run(paused, "WAITING_FOR_ACTION")
        wait_for(lambda: Job.objects.filter(pk=r.data["id"], state=JobState.WAITING).exists(), timeout=30,
                 message="plan job waiting")
        cancelled = api.post(f"{PLANS}/{paused.pk}/cancel")
        assert cancelled.status_code == 200, cancelled.content
        run = _run(paused, "CANCELLED")
        assert "Cancelled by an administrator at 'Group 1 (Databases): manual action after: Check'" in run.message
        assert "Done: db." in run.message
        assert _job(r.data["id"]).state == JobState.CANCELLED
        assert {ProtectedItem.objects.get(pk=items[n].pk).test_failover_state for n in ("app", "web")} == {"NONE"}
        db_vm = RecoveredVm.objects.get(item=items["db"], kind="TEST", removed_at__isnull=True)
        assert _vm_shas(db_vm) == shas["db"]
        assert api.post(f"{PLANS}/{paused.pk}/retry").status_code == 409  # a cancelled run is over
        refused = api.post(f"{PLANS}/{paused.pk}/testFailoverCleanup", {}, format="json")
        assert refused.status_code == 409 and "app has no test failover to clean up" in refused.json()["error"]["message"]
