"""The whole API, fuzzed from its own OpenAPI schema (schemathesis, in process over WSGI).

Every operation of /api/schema/ gets a bounded number of generated requests (valid and
invalid ones), sent as an admin with an API token (the agent endpoints with an agent's
Bearer token). Every answer must not be a server error and must match the schema: a
documented status code, the documented content type, a body of the documented shape.

Path ids are either generated or those of real fixture objects, so the operations also run
against objects that exist; destructive ones (deleting a vault, failing over) may run in any
order against them: each must answer 2xx or 4xx.

Bounded and reproducible: ``LIFEBOAT_FUZZ_EXAMPLES`` (default 12) examples per operation
and generation mode, ``LIFEBOAT_FUZZ_SEED`` (default 16) seeds Hypothesis; another seed
explores other inputs.
"""
from __future__ import annotations

import datetime
import os
import re

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.urls import Resolver404, resolve
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.factories import (
    DiskFactory,
    ProtectedItemFactory,
    RecoveryPointFactory,
    RecoverySiteFactory,
    ReplicaDiskFactory,
    VaultFactory,
)

EXAMPLES = int(os.environ.get("LIFEBOAT_FUZZ_EXAMPLES", "12"))
SEED = int(os.environ.get("LIFEBOAT_FUZZ_SEED", "16"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
PASS = "correct horse battery staple"

APP = WSGIHandler()
SCHEMA = schemathesis.openapi.from_wsgi("/api/schema/", APP)
OPERATIONS = sorted(
    (op.ok().method.upper(), op.ok().path) for op in SCHEMA.get_all_operations() if op.ok() is not None
)


@pytest.fixture
def in_test_transaction():
    """Requests go through Django's WSGI handler in this thread, inside the test's transaction:
    like Django's test client, keep the handler from closing the connection per request."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def world(db, admin_user):
    """One of each kind of object, so fixed path ids hit real rows."""
    from rest_framework.authtoken.models import Token

    from replication import agents as agent_services
    from vault import services
    from vault.models import Vault

    vault = VaultFactory(passphrase=PASS)
    item = ProtectedItemFactory(vault=vault)
    DiskFactory(machine=item.machine, key=2000)
    ReplicaDiskFactory(item=item, index=0, source_disk_key=2000)
    RecoveryPointFactory(item=item)
    RecoverySiteFactory(vault=vault)
    services.policy_create(vault=vault, name="spare-policy")
    VaultFactory(name="empty-vault", passphrase=PASS)
    agent, agent_token = agent_services.agent_register(
        vault=vault, hostname="fuzz-host",
        machine={"name": "fuzz-host", "instance_uuid": "fuzz-host-1", "disks": [
            {"key": 0, "path": "/dev/sdz", "capacity_bytes": 1024 * 1024}]},
    )
    server = item.process_server
    return {
        "admin": {"Authorization": f"Token {Token.objects.create(user=admin_user).key}"},
        "agent": {"Authorization": f"Bearer {agent_token}"},
        "agent_id": str(agent.pk),
        "process_server": {"Authorization": f"Bearer {agent_services.process_server_token(server=server)}"},
        "vault": Vault.objects.get(pk=vault.pk),
    }


def _fixed_ids(path: str, world) -> dict:
    """Path parameters naming existing rows: the first row of the viewset's queryset."""
    if "{agent_id}" in path:
        return {"agent_id": world["agent_id"]}
    concrete = re.sub(r"\{[^}]+\}", "1", path)
    try:
        match = resolve(concrete)
    except Resolver404:
        return {}
    view_cls = getattr(match.func, "cls", None)
    queryset = getattr(view_cls, "queryset", None)
    if queryset is None or not queryset.model.objects.exists():
        return {}
    fixed = {"id": queryset.model.objects.order_by("pk").values_list("pk", flat=True).first()}
    if "{disk}" in path:
        fixed["disk"] = 0
    if "{network_id}" in path:
        from vault.models import RecoveryNetwork

        network = RecoveryNetwork.objects.order_by("pk").first()
        if network is not None:
            fixed["network_id"] = network.pk
    return {name: value for name, value in fixed.items() if "{" + name + "}" in path}


def _headers(operation, world) -> dict:
    security = operation.definition.raw.get("security") or []
    if any("agentToken" in requirement for requirement in security):
        if "/processServers/" in operation.path:
            return world["process_server"]
        return world["agent"]
    return world["admin"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_answers_as_documented(method, path, world, in_test_transaction):
    operation = SCHEMA[path][method]
    headers = _headers(operation, world)
    fixed = _fixed_ids(path, world)
    strategies = [operation.as_strategy(generation_mode=mode) for mode in GenerationMode]
    if fixed:
        strategies += [operation.as_strategy(generation_mode=mode, path_parameters=fixed) for mode in GenerationMode]

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES * len(strategies),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(case=st.one_of(strategies))
    def run(case):
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


# --- the server errors the fuzz found, pinned ----------------------------------------------------------


def test_a_time_filter_with_an_offset_postgresql_refuses_is_compared_in_utc(world, api):
    from replication.models import RecoveryPoint

    point = RecoveryPoint.objects.get()
    answer = api.get("/api/v1/recoveryPoints/", {"after": "0001-01-01T00:00:00+20:53"})
    assert answer.status_code == 400 and "ISO 8601" in answer.json()["error"]["message"]  # year 0 in UTC
    answer = api.get("/api/v1/recoveryPoints/", {"before": "2999-01-01T00:00:00-19:23"})
    assert answer.status_code == 200 and [p["id"] for p in answer.json()["results"]] == [str(point.pk)]
    moment = point.time.astimezone(datetime.timezone(datetime.timedelta(hours=-19, minutes=-23)))
    answer = api.get("/api/v1/recoveryPoints/", {"after": moment.isoformat()})
    assert answer.status_code == 200 and [p["id"] for p in answer.json()["results"]] == [str(point.pk)]


def test_heartbeat_items_holding_nul_are_refused_and_change_nothing(world):
    from rest_framework.test import APIClient

    from replication.models import MobilityAgent

    agent = MobilityAgent.objects.get(pk=world["agent_id"])
    before = (agent.last_heartbeat_at, agent.last_status)
    client = APIClient()
    answer = client.post(f"/api/v1/agents/{agent.pk}/heartbeat", {"items": [{"note": "a\u0000b"}]}, format="json",
                         HTTP_AUTHORIZATION=world["agent"]["Authorization"])
    assert answer.status_code == 400 and "NUL" in answer.json()["error"]["message"], answer.content
    agent.refresh_from_db()
    assert (agent.last_heartbeat_at, agent.last_status) == before
