"""Roles per vault, the whole matrix: every role (Owner, Contributor, Operator, Reader, and a
user with no role on the vault) against every API operation of the OpenAPI schema and every
portal POST. What a role may do is never refused (403); what it may not is refused with a
sentence naming its role, and changes nothing; a user with no role sees none of the vault.

The expectations are this file's own table (``api_least_role``, ``PORTAL_POSTS``), not the
code's, and every route must be in it: a new operation has to be classified here."""
from __future__ import annotations

import re
import uuid

import pytest
from django.contrib.auth.models import Group
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from rest_framework.test import APIClient

from core.choices import JobState
from core.models import Job
from recovery_plans.models import RecoveryPlan
from recovery_plans.services import recovery_plan_create
from replication.models import ProtectedItem, RecoveryPoint, ReplicaDisk
from tests.conftest import grant_role
from tests.factories import PolicyFactory, ProtectedItemFactory, RecoveryPointFactory, VaultFactory
from vault import services
from vault.models import Alert, RoleAssignment, VCenter
from vault.services import alert_raise

ROLES = ["READER", "OPERATOR", "CONTRIBUTOR", "OWNER"]
RANK = {"NONE": 0, "READER": 1, "OPERATOR": 2, "CONTRIBUTOR": 3, "OWNER": 4, "SUPERUSER": 5}
LABEL = {"READER": "Reader", "OPERATOR": "Operator", "CONTRIBUTOR": "Contributor", "OWNER": "Owner"}


@pytest.fixture
def world(db, tmp_path, django_user_model):
    """Vault A with one of everything, users holding each role on it, and a stranger who owns
    vault B and holds nothing on A."""
    a = VaultFactory(name="vault-a")
    b = VaultFactory(name="vault-b")
    users = {role: django_user_model.objects.create_user(role.lower(), f"{role.lower()}@example.com", "pw-123456789")
             for role in ROLES}
    for role, user in users.items():
        grant_role(user, a, role)
    stranger = django_user_model.objects.create_user("stranger", "stranger@example.com", "pw-123456789")
    grant_role(stranger, b, "OWNER")
    item = ProtectedItemFactory(vault=a)
    ReplicaDisk.objects.create(item=item, index=0, source_disk_key=2000, capacity_bytes=8 * 2**20,
                               storage_name=f"{item.pk}-disk0")
    site = services.recovery_site_create(vault=a, name="rs", host=str(tmp_path / "rs"),
                                         networks=[("recovery-net", "RECOVERY"), ("test-net", "TEST")])
    point = RecoveryPointFactory(item=item)
    vcenter = services.vcenter_create(vault=a, name="sim", kind="simulated", host=str(tmp_path / "site"),
                                      username="u", password="p")
    plan = recovery_plan_create(vault=a, name="plan", groups=[{"name": "g", "items": [item]}])
    alert, _ = alert_raise(vault=a, key="t:1", kind="test", message="Disk full")
    job = Job.objects.create(vault=a, type="DISCOVERY", state=JobState.WAITING, target_type="vcenter",
                             target_id=str(vcenter.pk), target_name="sim", started_at=timezone.now())
    group = Group.objects.create(name="dr-team")
    from replication.groups import replication_group_create

    rgroup = replication_group_create(vault=a, name="rg", items=[ProtectedItemFactory(vault=a)])
    from replication.agents import agent_push, agent_register
    from replication.models import AgentRegistration

    agent = agent_push(machine=item.machine)
    # A second install registering as the item's machine without its agent's token: it waits.
    agent_register(vault=a, hostname="impostor", machine={
        "name": item.machine.name, "instance_uuid": item.machine.instance_uuid,
        "disks": [{"key": 0, "path": "/dev/sda", "capacity_bytes": 8 * 2**20}]})
    registration = AgentRegistration.objects.get(vault=a, machine=item.machine)
    return {
        "agent": agent, "registration": registration,
        "a": a, "b": b, "users": users, "stranger": stranger, "item": item, "site": site, "point": point,
        "vcenter": vcenter, "plan": plan, "alert": alert, "job": job, "policy": PolicyFactory(vault=a, name="gold"),
        "ps": services.process_server_create(vault=a, name="ps-a", host="127.0.0.1"),
        "mt": services.master_target_server_create(vault=a, name="mt-a", host="127.0.0.1"),
        "machine": item.machine, "network": site.networks.first(), "group": group, "rgroup": rgroup,
        "assignment": RoleAssignment.objects.get(vault=a, user=users["READER"]),
    }


def _snapshot(w) -> tuple:
    """What a refused request must leave as it was."""
    from failback.models import Failback
    from replication.models import AgentRegistration, MobilityAgent
    from vault.models import MasterTargetServer, ProcessServer, RecoverySite, ReplicationPolicy

    item = ProtectedItem.objects.get(pk=w["item"].pk)
    return (
        item.protection_state, item.test_failover_state, item.recovery_site_id, item.test_network_id,
        ProtectedItem.objects.count(), RecoveryPoint.objects.count(), ReplicationPolicy.objects.count(),
        ProcessServer.objects.count(), MasterTargetServer.objects.count(), VCenter.objects.count(),
        RecoverySite.objects.count(), RecoveryPlan.objects.count(), Failback.objects.count(),
        RoleAssignment.objects.count(), sorted(RoleAssignment.objects.values_list("role", flat=True)),
        Job.objects.count(), Job.objects.get(pk=w["job"].pk).state,
        Alert.objects.get(pk=w["alert"].pk).acknowledged,
        w["a"].__class__.objects.get(pk=w["a"].pk).description,
        AgentRegistration.objects.get(pk=w["registration"].pk).state,
        MobilityAgent.objects.filter(pk=w["agent"].pk).values_list("token_generation", flat=True).first(),
        ProtectedItem.objects.filter(pk=w["item"].pk).values_list("token_generation", flat=True).first(),
    )


# --- the API --------------------------------------------------------------------------------

# Not vault-scoped: the agents' and process servers' own endpoints (their tokens), a user's own
# API tokens, the schema.
API_EXCLUDED = re.compile(r"^/api/v1/(agents/(register|registrations/|\{agent_id\}/)|processServers/\{[^}]+\}/(heartbeat|uploaded)"
                          r"|apiTokens|schema)")
OPERATE_PATHS = re.compile(
    r"^/api/v1/(replicationProtectedItems/|replicationAlerts/\{id\}/acknowledge|replicationvCenters/\{id\}/discover"
    r"|replicationProtectableItems/\{id\}/workload|replicationJobs/\{id\}/(cancel|resume)|replicationGroups/\{id\}/takePoint"
    r"|replicationRecoveryPlans/\{id\}/(testFailover|testFailoverCleanup|plannedFailover|unplannedFailover|failoverCommit"
    r"|resume|cancel|retry|continue|reProtect|failBack|failbackCommit|reEnableReplication))")
MANAGE_ON_ITEMS = re.compile(r"/(rotateToken|rotateTokens)")
SENSITIVE = re.compile(r"/(configuration|disks/\{disk\}/image)/?$")


def api_least_role(method: str, path: str) -> str:
    """The least role an operation takes, as the design says (not as the code says)."""
    if path.startswith("/api/v1/roleAssignments"):
        return "OWNER"
    if method == "GET":
        return "OPERATOR" if SENSITIVE.search(path) else "READER"
    if path.rstrip("/") == "/api/v1/vaults" and method == "POST":
        return "SUPERUSER"
    if OPERATE_PATHS.search(path) and not MANAGE_ON_ITEMS.search(path):
        return "OPERATOR"
    return "CONTRIBUTOR"


def _operations() -> list[tuple[str, str]]:
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    out = []
    for path, methods in schema["paths"].items():
        if API_EXCLUDED.search(path):
            continue
        for method in methods:
            if method.upper() in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                out.append((method.upper(), path))
    return sorted(out)


IDS = {
    "vaults": "a", "replicationPolicies": "policy", "configurationServers": None, "processServers": "ps",
    "masterTargetServers": "mt", "replicationvCenters": "vcenter", "replicationProtectableItems": "machine",
    "replicationProtectedItems": "item", "recoveryPoints": "point", "replicationGroups": "rgroup",
    "recoverySites": "site", "replicationRecoveryPlans": "plan", "replicationJobs": "job",
    "replicationEvents": None, "replicationAlerts": "alert", "failbacks": None, "roleAssignments": "assignment",
    "agents": "agent", "agentRegistrations": "registration",
}


def _url(w, path: str) -> str | None:
    head = path.split("/")[3]
    key = IDS.get(head)

    def value(match):
        name = match.group(1)
        if name in ("id", "pk"):
            return str(w[key].pk) if key else str(uuid.uuid4())
        if name == "disk":
            return "0"
        if name == "network_id":
            return str(w["network"].pk)
        return "1"

    return re.sub(r"\{([^}]+)\}", value, path)


def _body(w, method: str, path: str) -> dict:
    if method in ("GET", "DELETE"):
        return {}
    # Enough for a create to name its vault (the role is checked on it); other fields may be
    # missing or wrong: an allowed role then gets a 400, never a 403.
    return {"vault": w["a"].pk, "name": "x", "role": "READER", "user": "stranger", "recoveryPoint": "latest"}


def pytest_generate_tests(metafunc):
    if "operation" in metafunc.fixturenames:
        metafunc.parametrize("operation", _operations(), ids=lambda op: f"{op[0]} {op[1]}")


def _client(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def _call(client, method, url, body):
    return getattr(client, method.lower())(url, body, format="json") if body else getattr(client, method.lower())(url)


def test_every_role_against_every_api_operation(world, operation):
    method, path = operation
    least = api_least_role(method, path)
    url = _url(world, path)
    body = _body(world, method, path)
    # Refused first (they must change nothing), then the allowed roles from the least up.
    for role in ROLES:
        if RANK[role] >= RANK[least]:
            continue
        before = _snapshot(world)
        response = _call(_client(world["users"][role]), method, url, body)
        assert response.status_code == 403, (role, method, url, response.status_code, response.content[:300])
        message = response.json()["error"]["message"]
        if least == "SUPERUSER":
            assert "administrator" in message, message
        else:
            assert LABEL[role] in message and "vault-a" in message, message
        assert _snapshot(world) == before, (role, method, url)
    # A user with no role on vault A: its objects do not exist for them, and nothing changes.
    before = _snapshot(world)
    response = _call(_client(world["stranger"]), method, url, body)
    if "{" in path:  # an object of vault A
        assert response.status_code in (403, 404), (method, url, response.status_code, response.content[:300])
    elif method == "GET":
        assert response.status_code == 200
        assert "vault-a" not in response.content.decode() and str(world["item"].pk) not in response.content.decode()
    else:  # a create naming vault A
        assert response.status_code == 403, (method, url, response.status_code, response.content[:300])
    assert _snapshot(world) == before
    for role in ROLES:
        if RANK[role] < RANK[least]:
            continue
        response = _call(_client(world["users"][role]), method, url, body)
        assert response.status_code != 403, (role, method, url, response.content[:300])
        assert response.status_code < 500, (role, method, url, response.content[:300])


def test_lists_show_only_the_vaults_one_holds_a_role_on(world):
    stranger = _client(world["stranger"])
    vaults = stranger.get("/api/v1/vaults/").json()["results"]
    assert [v["name"] for v in vaults] == ["vault-b"]
    for path in ("replicationProtectedItems", "recoveryPoints", "replicationPolicies", "replicationJobs",
                 "replicationAlerts", "replicationRecoveryPlans", "recoverySites", "processServers"):
        assert stranger.get(f"/api/v1/{path}/").json()["results"] == [], path
        assert stranger.get(f"/api/v1/{path}/?vault={world['a'].pk}").json()["results"] == [], path
    reader = _client(world["users"]["READER"])
    listed = {i["id"] for i in reader.get("/api/v1/replicationProtectedItems/").json()["results"]}
    assert listed == {str(pk) for pk in ProtectedItem.objects.filter(vault=world["a"]).values_list("pk", flat=True)}


def test_a_group_role_counts_and_the_highest_role_wins(world, django_user_model):
    member = django_user_model.objects.create_user("member", "m@example.com", "pw-123456789")
    member.groups.add(world["group"])
    client = _client(member)
    assert client.get(f"/api/v1/replicationProtectedItems/{world['item'].pk}/").status_code == 404
    grant_role(member, world["a"], "READER")
    from vault.roles import role_assign

    role_assign(vault=world["a"], role="OPERATOR", group=world["group"])
    member = django_user_model.objects.get(pk=member.pk)  # roles are read once per request
    response = _client(member).post(f"/api/v1/replicationAlerts/{world['alert'].pk}/acknowledge/")
    assert response.status_code == 200


def test_owners_manage_access_and_the_last_owner_stays(world):
    owner = _client(world["users"]["OWNER"])
    r = owner.post("/api/v1/roleAssignments/", {"vault": world["a"].pk, "user": "stranger", "role": "OPERATOR"},
                   format="json")
    assert r.status_code == 201, r.content
    assert RoleAssignment.objects.get(vault=world["a"], user=world["stranger"]).role == "OPERATOR"
    bad = owner.post("/api/v1/roleAssignments/", {"vault": world["a"].pk, "user": "nobody", "role": "OPERATOR"},
                     format="json")
    assert bad.status_code == 404 and "nobody" in bad.json()["error"]["message"]
    last = RoleAssignment.objects.get(vault=world["a"], role="OWNER")
    refused = owner.delete(f"/api/v1/roleAssignments/{last.pk}/")
    assert refused.status_code == 409 and "no owner left" in refused.json()["error"]["message"]
    assert RoleAssignment.objects.filter(pk=last.pk).exists()


# --- the portal -----------------------------------------------------------------------------

# Every portal route that changes something, with the least role it takes and how to call it.
# (name, args from the world, POST data, least role)
PORTAL_POSTS = {
    "vault-create": (lambda w: [], {"name": "x", "passphrase": "a-long-enough-passphrase"}, "SUPERUSER"),
    "vault-settings": (lambda w: [], {"name": "vault-a", "description": "changed"}, "CONTRIBUTOR"),
    "role-add": (lambda w: [], {"kind": "user", "who": "stranger", "role": "READER"}, "OWNER"),
    "role-remove": (lambda w: [w["assignment"].pk], {}, "OWNER"),
    "vcenter-add": (lambda w: [], {"name": "x"}, "CONTRIBUTOR"),
    "vcenter-discover": (lambda w: [w["vcenter"].pk], {}, "OPERATOR"),
    "recovery-site-add": (lambda w: [], {"name": "x"}, "CONTRIBUTOR"),
    "policy-create": (lambda w: [], {"name": "x"}, "CONTRIBUTOR"),
    "policy-edit": (lambda w: [w["policy"].pk], {"name": "gold"}, "CONTRIBUTOR"),
    "alert-acknowledge": (lambda w: [w["alert"].pk], {}, "OPERATOR"),
    "enable": (lambda w: [], lambda w: {"machines": [w["machine"].pk]}, "OPERATOR"),
    "item-workload": (lambda w: [w["item"].pk], {"rate_bytes_per_s": 1}, "OPERATOR"),
    "item-network-mapping": (lambda w: [w["item"].pk], lambda w: {"recovery_site": w["site"].pk}, "OPERATOR"),
    "item-recovery": (lambda w: [w["item"].pk, "test-failover"], {"point": "latest"}, "OPERATOR"),
    "item-failback": (lambda w: [w["item"].pk, "reprotect"], {}, "OPERATOR"),
    "item-action": (lambda w: [w["item"].pk, "resync"], {}, "OPERATOR"),
    "job-cancel": (lambda w: [w["job"].pk], {}, "OPERATOR"),
    "job-resume": (lambda w: [w["job"].pk], {}, "OPERATOR"),
    "plan-create": (lambda w: [], {"name": "x"}, "CONTRIBUTOR"),
    "plan-edit": (lambda w: [w["plan"].pk, "add-group"], {"name": "x"}, "CONTRIBUTOR"),
    "plan-delete": (lambda w: [w["plan"].pk], {"confirm_name": "plan"}, "CONTRIBUTOR"),
    "plan-run-operation": (lambda w: [w["plan"].pk, "test-failover"], {"confirm": "on"}, "OPERATOR"),
    # A user's own API tokens: anyone signed in, for themselves.
    "tokens": (lambda w: [], {"name": "mine"}, "READER"),
    "token-revoke": None,  # a user's own token, by its id: tests/core/test_api_tokens.py
    "agent-registration-decide": (lambda w: [w["registration"].pk, "reject"], {}, "CONTRIBUTOR"),
}
# Routes that only show.
PORTAL_GETS = {"overview", "infrastructure", "recovery-sites", "policies", "alerts", "items", "item-detail", "jobs",
               "job-detail", "plans", "plan-detail", "plan-run", "events", "machines"}


def _portal_names() -> set[str]:
    names = set()

    def walk(patterns, namespace=""):
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, p.namespace or namespace)
            elif isinstance(p, URLPattern) and namespace == "portal" and p.name:
                names.add(p.name)

    walk(get_resolver().url_patterns)
    return names


def test_every_portal_route_is_classified():
    unknown = _portal_names() - set(PORTAL_POSTS) - PORTAL_GETS
    assert not unknown, f"classify these portal routes in tests/vault/test_roles.py: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(n for n, spec in PORTAL_POSTS.items() if spec is not None))
def test_every_role_against_every_portal_post(world, client, name):
    args, data, least = PORTAL_POSTS[name]
    url = reverse(f"portal:{name}", args=args(world))
    data = data(world) if callable(data) else data
    for role in ROLES:
        if RANK[role] >= RANK[least]:
            continue
        before = _snapshot(world)
        client.force_login(world["users"][role])
        response = client.post(url, data)
        assert response.status_code == 403, (role, name, response.status_code)
        assert _snapshot(world) == before, (role, name)
        if least != "SUPERUSER":
            assert LABEL[role] in response.content.decode(), (role, name)
    client.force_login(world["stranger"])
    before = _snapshot(world)
    response = client.post(url, data)
    # The stranger's portal shows vault B: an object of A does not exist for them; a form
    # without an object acts on vault B, never on A.
    assert response.status_code in (200, 302, 400, 403, 404), (name, response.status_code)
    assert _snapshot(world) == before, name
    for role in ROLES:
        if RANK[role] < RANK[least]:
            continue
        client.force_login(world["users"][role])
        response = client.post(url, data)
        assert response.status_code not in (403,) and response.status_code < 500, (role, name, response.status_code)


def test_the_portal_hides_what_a_role_cannot_do(world, client):
    item = world["item"]
    url = reverse("portal:item-detail", args=[item.pk])
    shown = {}
    for role in ROLES:
        client.force_login(world["users"][role])
        html = client.get(url).content.decode()
        shown[role] = "Disable replication" in html
    assert shown == {"READER": False, "OPERATOR": True, "CONTRIBUTOR": True, "OWNER": True}
    client.force_login(world["users"]["OPERATOR"])
    assert "New recovery plan" not in client.get(reverse("portal:plans")).content.decode()
    client.force_login(world["users"]["CONTRIBUTOR"])
    assert "New recovery plan" in client.get(reverse("portal:plans")).content.decode()
    assert "Give the role" not in client.get(reverse("portal:vault-settings")).content.decode()
    client.force_login(world["users"]["OWNER"])
    assert "Give the role" in client.get(reverse("portal:vault-settings")).content.decode()
    client.force_login(world["stranger"])
    assert client.get(url).status_code == 404
    assert "vault-a" not in client.get(reverse("portal:overview")).content.decode()
