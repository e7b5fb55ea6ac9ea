"""Failback of a whole recovery plan through the API, on real parts: the plan fails over and
commits, its recovered VMs write, then the plan is reprotected, failed back (planned, group
after group, with its actions), committed and re-enabled; each VM's on-premises disks end
byte-equal to its recovered VM's, and every item is protected again in its original
direction."""
from __future__ import annotations

import threading

import pytest

from core.choices import JobState
from failback.models import Failback
from recovery_plans.run_models import RecoveryPlanRun
from replication.choices import Direction
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem
from tests.e2e.harness import free_port, process_server
from tests.failback.test_failback_e2e import Writes, _file_shas, _recovered_shas
from tests.recovery_plans.test_run_e2e import PLANS, _job, _plan, _protect_all, _run, _vms
from tests.recovery_plans.test_run_e2e import site  # noqa: F401  the fixture
from vault import services as vault_services

pytestmark = pytest.mark.timeout(1200)


def _plan_step(api, plan, action: str, body: dict | None = None, *, timeout=300) -> RecoveryPlanRun:
    r = api.post(f"{PLANS}/{plan.pk}/{action}", body or {}, format="json")
    assert r.status_code == 202, r.content
    assert _job(r.json()["id"], timeout=timeout).state in JobState.TERMINAL
    run = _run(plan, "SUCCEEDED", "FAILED", timeout=timeout)
    assert run.state == "SUCCEEDED", run.message
    return run


def test_a_plan_fails_back_and_is_protected_again(site, api):  # noqa: F811
    from replication.agent_host import AgentHost
    from replication.process_servers import process_server_config
    from vault.connectors.recovery_sim import _LocalSite
    from vault.connectors.simsite import run_workload

    recovery_dir = site.tmp / "recovery"
    recovery = vault_services.recovery_site_create(vault=site.vault, name="recovery-site", host=str(recovery_dir),
                                                   networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")])
    ps_back = vault_services.process_server_create(vault=site.vault, name="ps-recovery", host="127.0.0.1",
                                                   data_port=free_port(), site="RECOVERY")
    vault_services.master_target_server_create(vault=site.vault, name="mt-01", host="127.0.0.1")
    back_config = process_server_config(server=ps_back, cache_dir=str(site.tmp / "ps-back-cache"))
    back_config["report_interval"] = 1.0
    (site.tmp / "ps-fwd").mkdir()
    (site.tmp / "ps-back").mkdir()
    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp / "ps-fwd"), process_server(back_config, site.tmp / "ps-back"):
        site.start_agents()
        site.start_beat()
        back_agents = AgentHost(str(recovery_dir), scan_interval=0.2, heartbeat_interval=1.0, assignment_interval=0.5)
        back_agents.stop = site._stop
        threading.Thread(target=back_agents.run, daemon=True, name="recovery-agents").start()
        items = _protect_all(site, api, recovery)
        plan = _plan(api, site, items, [
            {"name": "data", "items": [str(items["db"].pk)], "actions": [
                {"phase": "POST", "kind": "SCRIPT", "name": "data is up", "script": "echo $LIFEBOAT_PLAN_OPERATION"}]},
            {"name": "front", "items": [str(items["app"].pk), str(items["web"].pk)]},
        ], name="shop")
        # Not before a committed failover: nothing starts.
        refused = api.post(f"{PLANS}/{plan.pk}/reProtect", {}, format="json")
        assert refused.status_code == 409 and "not a committed failover" in refused.json()["error"]["message"]

        _plan_step(api, plan, "plannedFailover")
        writer.set()
        writer.thread.join(timeout=10)
        _plan_step(api, plan, "failoverCommit")
        vms = _vms(items, "FAILOVER")

        written = Writes()
        recovered_site = _LocalSite(str(recovery_dir), "", "")
        recovered_site.connect()
        stop = threading.Event()
        recovered_writer = threading.Thread(target=run_workload, args=(recovered_site, stop),
                                            kwargs={"seed": 5, "on_write": written}, daemon=True)
        recovered_writer.start()

        bad = api.post(f"{PLANS}/{plan.pk}/reProtect", {"location": "MOON"}, format="json")
        assert bad.status_code == 400
        assert not Failback.objects.exists()
        run = _plan_step(api, plan, "reProtect")
        assert sorted(i["state"] for i in run.items.values()) == ["SUCCEEDED"] * 3
        for item in items.values():
            failback = Failback.objects.get(item=item)
            assert failback.state == "REPLICATING_BACK"
            assert failback.returning_item.direction == Direction.RECOVERY_TO_PRIMARY
            assert failback.figures["reprotect"]["sent_bytes"] < failback.figures["reprotect"]["compared_bytes"]

        run = _plan_step(api, plan, "failBack", {"type": "planned"})
        stop.set()
        recovered_writer.join(timeout=10)
        assert any("data is up" in step["name"] and step["state"] == "SUCCEEDED" for step in run.job.steps)
        for name, item in items.items():
            onprem = {d.index: site.site.disk_path(item.machine.instance_uuid, d.source_disk_key)
                      for d in item.replica_disks.all()}
            assert _file_shas(onprem) == _recovered_shas(vms[name]), f"{name}: a write of the recovery site is missing"
            assert site.site.get_vm(item.machine.instance_uuid).power_state == "poweredOn"
        assert written.bytes > 0

        _plan_step(api, plan, "failbackCommit")
        _plan_step(api, plan, "reEnableReplication")
        for item in items.values():
            item.refresh_from_db()
            assert (item.protection_state, item.direction) == (P.PROTECTED, Direction.PRIMARY_TO_RECOVERY)
            assert Failback.objects.get(item=item).state == "COMPLETED"
        assert not ProtectedItem.objects.filter(direction=Direction.RECOVERY_TO_PRIMARY).exists()
