"""An outside client scripting protection through HTTP only, with a token, as a DR admin's
automation would: discover what to protect, protect it, watch it, change it, disable it."""
from __future__ import annotations

import pytest
import requests

from core.tokens import token_create
from tests.conftest import wait_for
from tests.e2e.harness import MiB, Site, process_server

pytestmark = pytest.mark.timeout(600)

VMS = [
    {"name": "rest-a", "disks": [4 * MiB], "workload": {"rate_bytes_per_s": 256 * 1024, "write_size": 16 * 1024, "pattern": "uniform"}},
    {"name": "rest-b", "disks": [4 * MiB, 2 * MiB], "workload": {"rate_bytes_per_s": 128 * 1024, "write_size": 8 * 1024, "pattern": "sequential"}},
]


class Client:
    def __init__(self, base: str, token: str):
        self.base = base.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kw) -> requests.Response:
        return self.http.request(method, path if path.startswith("http") else f"{self.base}{path}", timeout=30, **kw)

    def ok(self, method: str, path: str, expect: int = 200, **kw):
        r = self.call(method, path, **kw)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text[:300]}"
        return r

    def wait_job(self, location: str, timeout: float = 180) -> dict:
        job = wait_for(lambda: (lambda j: j if j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None)(self.ok("GET", location).json()),
                       timeout=timeout, interval=0.5, message=f"job {location}")
        assert job["state"] == "SUCCEEDED", job["error"]
        return job


@pytest.fixture
def site(tmp_path, live_server, celery_worker):
    s = Site(tmp=tmp_path, live_url=live_server.url, vms=VMS)
    yield s
    s.close()


def test_protect_watch_and_disable_through_http_only(site, live_server, admin_user):
    # A personal API token, as the admin makes one in the portal (or the API) for a script.
    _, token = token_create(user=admin_user, name="e2e REST client")
    api = Client(live_server.url, token)
    assert api.call("GET", "/api/v1/vaults/", headers={"Authorization": "Token wrong"}).status_code == 401
    assert api.call("GET", "/api/v1/vaults/", headers={"Authorization": "Bearer lbt_wrong"}).status_code == 401

    schema = api.ok("GET", "/api/schema/", headers={"Accept": "application/json"}).json()
    assert "/api/v1/replicationProtectedItems/{id}/repairReplication" in {p.rstrip("/") for p in schema["paths"]} or any(
        "repairReplication" in p for p in schema["paths"])

    writer = site.start_workload()
    with process_server(site.ps_config(), site.tmp):
        site.start_agents()
        site.start_beat()
        vault = next(v for v in api.ok("GET", "/api/v1/vaults/").json()["results"] if v["name"] == "e2e")
        machines = api.ok("GET", f"/api/v1/replicationProtectableItems/?vault={vault['id']}&protected=false").json()["results"]
        assert sorted(m["name"] for m in machines) == ["rest-a", "rest-b"]
        policy = api.ok("GET", f"/api/v1/replicationPolicies/?vault={vault['id']}&is_failback=false").json()["results"][0]
        ps = api.ok("GET", f"/api/v1/processServers/?vault={vault['id']}").json()["results"][0]
        wait_for(lambda: api.ok("GET", f"/api/v1/processServers/{ps['id']}/").json()["last_heartbeat_at"], message="process server heartbeat")

        # Bad input first: nothing changes.
        bad = api.call("POST", "/api/v1/replicationProtectedItems/", json={"vault": vault["id"], "machine": machines[0]["id"]})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid"

        locations = []
        for m in machines:
            r = api.ok("POST", "/api/v1/replicationProtectedItems/", expect=202,
                       json={"vault": vault["id"], "machine": m["id"], "policy": policy["id"], "process_server": ps["id"]})
            locations.append(r.headers["Location"])
        jobs = [api.wait_job(loc) for loc in locations]
        items = {j["target_name"]: api.ok("GET", f"/api/v1/replicationProtectedItems/{j['target_id']}/").json() for j in jobs}
        assert {i["protection_state"] for i in items.values()} == {"PROTECTED"}
        assert len(items["rest-b"]["replica_disks"]) == 2

        # Watch: recovery points come, RPO is reported, the data path moves.
        for name, item in items.items():
            wait_for(lambda: api.ok("GET", f"/api/v1/recoveryPoints/?item={item['id']}").json()["count"] >= 2,
                     timeout=90, message=f"recovery points of {name}")
        # Churn is scriptable too (the simulated site's control).
        api.ok("POST", f"/api/v1/replicationProtectableItems/{machines[0]['id']}/workload",
               json={"rate_bytes_per_s": 512 * 1024, "write_size": 4096, "pattern": "hotspot"})
        assert api.call("POST", f"/api/v1/replicationProtectableItems/{machines[0]['id']}/workload",
                        json={"rate_bytes_per_s": 1, "write_size": 1000, "pattern": "hotspot"}).status_code == 400
        again = api.call("POST", "/api/v1/replicationProtectedItems/",
                         json={"vault": vault["id"], "machine": machines[0]["id"], "policy": policy["id"], "process_server": ps["id"]})
        assert again.status_code == 409

        # Disable both; the items and their replica data go.
        for item in items.values():
            r = api.ok("DELETE", f"/api/v1/replicationProtectedItems/{item['id']}/", expect=202)
            api.wait_job(r.headers["Location"])
            assert api.call("GET", f"/api/v1/replicationProtectedItems/{item['id']}/").status_code == 404
        writer.set()
