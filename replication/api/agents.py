"""The configuration server's side of the agent and process-server protocols.

Agents register with the vault's passphrase and get a token (HMAC of ``agent:<id>`` under
the vault's auth key); with it they fetch their assignment (the items to replicate, each
with its item token for the process server), send heartbeats and report events. Process
servers send heartbeats with the token of ``process-server:<id>``; the answer tells them the
item token generations still valid.

Registering as a machine that has an agent takes that agent's token (``Authorization:
Bearer``); without it the registration waits for an administrator (202, with a secret the
agent polls ``agents/registrations/<id>`` with until it is approved or rejected).
"""
from __future__ import annotations

import logging
import uuid

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view, authentication_classes, permission_classes, throttle_classes
from rest_framework.permissions import AllowAny
from rest_framework.response import Response

from core.api import holds_nul
from core.exceptions import PermissionDenied
from core.schema import AGENT_TOKEN
from core.filters import BIGINT_MAX
from core.validators import single_line
from core.jobs import job_wake
from replication import agents as agent_services
from replication import tokens as agent_tokens
from replication.api.throttles import AgentRegistrationThrottle
from replication.choices import RegistrationState
from replication.models import MobilityAgent
from replication.tasks import apply_wake
from replication.waits import machine_wait_key
from vault.models import ProcessServer, Vault

logger = logging.getLogger(__name__)

# The schema's security requirement of the endpoints that take a Bearer token (core/schema.py).
AGENT_AUTH = [{AGENT_TOKEN: []}]


class DiskReport(serializers.Serializer):
    key = serializers.IntegerField(min_value=0, max_value=2**31 - 1)
    path = serializers.CharField(max_length=1000)
    capacity_bytes = serializers.IntegerField(min_value=512, max_value=BIGINT_MAX)
    label = serializers.CharField(max_length=120, required=False, allow_blank=True)

    def validate_capacity_bytes(self, value):
        if value % 512:
            raise serializers.ValidationError("A disk's capacity is a whole number of 512-byte sectors.")
        return value


class MachineReport(serializers.Serializer):
    name = serializers.CharField(max_length=255, validators=[single_line])
    os = serializers.CharField(max_length=120, required=False, allow_blank=True)
    # Letters, digits and hyphens only: an id may name a directory, a name never does.
    instance_uuid = serializers.RegexField(r"^[A-Za-z0-9-]{1,64}\Z", required=False, error_messages={
        "invalid": "instance_uuid is letters, digits and hyphens (at most 64)."})
    disks = DiskReport(many=True, allow_empty=False, max_length=64)


class RegisterSerializer(serializers.Serializer):
    passphrase = serializers.CharField(max_length=256)
    hostname = serializers.CharField(max_length=255, validators=[single_line])
    vault = serializers.CharField(max_length=80, required=False, help_text="Vault name, when several share a server.")
    version = serializers.CharField(max_length=40, required=False, allow_blank=True)
    machine = MachineReport()


def _refuse_nul(items) -> None:
    """Items are kept as sent (jsonb), which holds no NUL character."""
    if holds_nul(items):
        raise serializers.ValidationError("items must not hold NUL characters (\\u0000).")


def _check_counter(where: str, key: str, value) -> None:
    """A counter the vault stores in a bigint column: a whole number from 0 to 2^63 - 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= BIGINT_MAX:
        raise serializers.ValidationError(f"{where}{key} must be a whole number from 0 to {BIGINT_MAX}.")


class HeartbeatSerializer(serializers.Serializer):
    items = serializers.ListField(child=serializers.DictField(), required=False, max_length=64)
    version = serializers.CharField(max_length=40, required=False, allow_blank=True)

    def validate_items(self, items):
        """The per-item figures the vault stores are checked here; the rest is kept as sent."""
        _refuse_nul(items)
        for status in items:
            for key in ("acked_seq", "backlog_bytes", "pass_done_seq"):
                _check_counter("", key, status.get(key))
            progress = status.get("progress")
            if progress is not None and (isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0 <= progress <= 1):
                raise serializers.ValidationError("progress must be a fraction from 0 to 1.")
            if status.get("item_id") is not None and not isinstance(status["item_id"], str):
                raise serializers.ValidationError("item_id must be a string.")
        return items


class AgentEventSerializer(serializers.Serializer):
    item_id = serializers.UUIDField()
    kind = serializers.ChoiceField(choices=["resync_required", "resync_complete", "initial_progress", "error"])
    message = serializers.CharField(max_length=2000, required=False, allow_blank=True)
    progress = serializers.IntegerField(min_value=0, max_value=100, required=False)


class PsHeartbeatSerializer(serializers.Serializer):
    cpu_percent = serializers.FloatField(min_value=0, max_value=100, required=False)
    memory_percent = serializers.FloatField(min_value=0, max_value=100, required=False)
    cache_free_bytes = serializers.IntegerField(min_value=0, max_value=BIGINT_MAX, required=False)
    cache_total_bytes = serializers.IntegerField(min_value=0, max_value=BIGINT_MAX, required=False)
    pending_upload_bytes = serializers.IntegerField(min_value=0, max_value=BIGINT_MAX, required=False)
    thumbprint = serializers.CharField(max_length=128, required=False, allow_blank=True)
    # Counters since the server started (its data path's rates: replication/data_path.py).
    started_at = serializers.FloatField(min_value=0, max_value=1e11, required=False, help_text="When the server started (Unix time).")
    received_bytes = serializers.IntegerField(min_value=0, max_value=BIGINT_MAX, required=False)
    uploaded_bytes = serializers.IntegerField(min_value=0, max_value=BIGINT_MAX, required=False)
    items = serializers.DictField(child=serializers.DictField(), required=False, help_text=(
        "Per item id: acked_seq, uploaded_seq, pending_batches, pending_bytes, received_bytes, uploaded_bytes."))

    def validate_items(self, items):
        _refuse_nul(items)
        for item_id, figures in items.items():
            try:
                uuid.UUID(item_id)
            except ValueError:
                raise serializers.ValidationError(f"{item_id[:40]!r} is not an item id.") from None
            for key in ("acked_seq", "uploaded_seq", "pending_batches", "pending_bytes", "received_bytes", "uploaded_bytes"):
                _check_counter("", key, figures.get(key))
        return items


class PsUploadedSerializer(serializers.Serializer):
    items = serializers.ListField(child=serializers.UUIDField(), allow_empty=False, max_length=1000, help_text=(
        "Ids of the items whose replication logs the server has just put into cache storage."))


def _bearer(request) -> str:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise PermissionDenied("A Bearer token is required.", code="not_authenticated")
    return header[len("Bearer "):].strip()


def _agent(request, agent_id, *, previous: bool = False) -> MobilityAgent:
    """The calling agent, by its token at its current generation (with ``previous``, also the
    token a rotation under way replaces: the assignment hands out the new one)."""
    token = _bearer(request)
    agent = MobilityAgent.objects.select_related("vault", "machine").filter(pk=agent_id).first()
    result = agent_tokens.agent_token_check(agent=agent, token=token, previous=previous) if agent else agent_tokens.INVALID
    if result == agent_tokens.REVOKED and agent.rotating and \
            agent_tokens.token_generation(token) == agent.token_generation - 1:
        raise PermissionDenied("This agent's token was rotated: its assignment hands out the new one.",
                               code="token_rotated")
    if result == agent_tokens.REVOKED:
        raise PermissionDenied("This agent's credentials were revoked (or replaced by an approved registration): "
                               "register the agent again; an administrator approves it in the portal.",
                               code="token_revoked")
    if result != agent_tokens.VALID:
        # One answer for both, so tokens cannot be used to probe for agent ids.
        raise PermissionDenied("Unknown agent or wrong token.", code="bad_token")
    if agent.rotating and agent_tokens.token_generation(token) == agent.token_generation:
        agent_services.agent_rotation_done(agent=agent)  # the first call with the new token
    return agent


def _validated(serializer_class, request):
    s = serializer_class(data=request.data)
    s.is_valid(raise_exception=True)
    return s.validated_data


REGISTERED = inline_serializer("AgentRegistered", {"agent_id": serializers.UUIDField(), "token": serializers.CharField()})
PENDING = inline_serializer("AgentRegistrationPending", {
    "status": serializers.CharField(help_text='"pending"'), "registration_id": serializers.UUIDField(),
    "poll_token": serializers.CharField(help_text="The secret to poll agents/registrations/<id> with (answered once)."),
    "message": serializers.CharField()})
POLL_PENDING = inline_serializer("AgentRegistrationWaiting", {
    "status": serializers.CharField(help_text='"pending"'), "registration_id": serializers.UUIDField(),
    "message": serializers.CharField()})


def _pending_answer(registration, **extra) -> Response:
    return Response({"status": "pending", "registration_id": str(registration.pk), **extra,
                     "message": agent_services.APPROVAL_SENTENCE}, status=202)


@extend_schema(request=RegisterSerializer, responses={201: REGISTERED, 202: PENDING}, auth=[], tags=["agents"])
@api_view(["POST"])
@authentication_classes([])
@permission_classes([AllowAny])
@throttle_classes([AgentRegistrationThrottle])
def agent_register(request):
    """A mobility agent joins the vault with its registration passphrase. A machine that has
    an agent already is registered again only with that agent's token (``Authorization:
    Bearer``); otherwise the registration waits for an administrator's approval (202)."""
    data = _validated(RegisterSerializer, request)
    vaults = Vault.objects.filter(name=data["vault"]) if data.get("vault") else Vault.objects.all()
    vault = next((v for v in vaults if v.check_passphrase(data["passphrase"])), None)
    if vault is None:
        AgentRegistrationThrottle.failed(request)
        raise PermissionDenied("The registration passphrase is not that of any vault.", code="bad_passphrase")
    header = request.headers.get("Authorization", "")
    outcome = agent_services.agent_register(
        vault=vault, hostname=data["hostname"], machine=data["machine"], version=data.get("version", ""),
        token=header[len("Bearer "):].strip() if header.startswith("Bearer ") else None,
        remote_addr=request.META.get("REMOTE_ADDR"),
    )
    if isinstance(outcome, agent_services.AwaitingApproval):
        return _pending_answer(outcome.registration, poll_token=outcome.poll_token)
    job_wake(machine_wait_key(outcome.agent.machine_id))  # an enable waiting for this agent goes on
    return Response({"agent_id": str(outcome.agent.pk), "token": outcome.token}, status=201)


@extend_schema(request=None, responses={200: REGISTERED, 202: POLL_PENDING}, auth=AGENT_AUTH, tags=["agents"])
@api_view(["GET"])
@authentication_classes([])
@permission_classes([AllowAny])
def agent_registration_status(request, registration_id):
    """A registration waiting for approval, polled with its secret (``Authorization: Bearer
    <poll_token>``): 202 while it waits, 200 with the agent's credentials once approved,
    403 ``registration_rejected`` if an administrator rejected it."""
    outcome = agent_services.agent_registration_poll(registration_id=registration_id, poll_token=_bearer(request))
    if isinstance(outcome, agent_services.Registered):
        job_wake(machine_wait_key(outcome.agent.machine_id))
        return Response({"agent_id": str(outcome.agent.pk), "token": outcome.token})
    if outcome.state == RegistrationState.REJECTED:
        raise PermissionDenied(f"An administrator rejected this registration of {outcome.hostname} as "
                               f"{outcome.machine.name}: ask them, then register again.", code="registration_rejected")
    return _pending_answer(outcome)


@extend_schema(request=None, responses=inline_serializer("AgentAssignment", {"items": serializers.ListField(child=serializers.DictField())}), auth=AGENT_AUTH, tags=["agents"])
@api_view(["GET"])
@authentication_classes([])
@permission_classes([AllowAny])
def agent_assignment(request, agent_id):
    """The items this agent replicates, with their process servers and item tokens (and,
    while its token is being rotated, ``agent_token``: the new one)."""
    return Response(agent_services.agent_assignment(agent=_agent(request, agent_id, previous=True)))


@extend_schema(request=HeartbeatSerializer, responses={204: None}, auth=AGENT_AUTH, tags=["agents"])
@api_view(["POST"])
@authentication_classes([])
@permission_classes([AllowAny])
def agent_heartbeat(request, agent_id):
    agent = _agent(request, agent_id)
    agent_services.agent_heartbeat(agent=agent, report=_validated(HeartbeatSerializer, request))
    job_wake(machine_wait_key(agent.machine_id))  # a resync waiting on the agent's phase looks again
    return Response(status=204)


@extend_schema(request=AgentEventSerializer, responses={204: None}, auth=AGENT_AUTH, tags=["agents"])
@api_view(["POST"])
@authentication_classes([])
@permission_classes([AllowAny])
def agent_event(request, agent_id):
    agent = _agent(request, agent_id)
    data = _validated(AgentEventSerializer, request)
    agent_services.agent_event(agent=agent, **data)
    job_wake(machine_wait_key(agent.machine_id))
    return Response(status=204)


@extend_schema(request=PsHeartbeatSerializer, responses=inline_serializer("ProcessServerHeartbeatAnswer", {
    "token_generations": serializers.DictField(child=serializers.IntegerField(), help_text=(
        "Per item id, the lowest item token generation still valid; items not listed accept every generation."))}),
    auth=AGENT_AUTH, tags=["processServers"])
@api_view(["POST"])
@authentication_classes([])
@permission_classes([AllowAny])
def process_server_heartbeat(request, pk):
    """A process server reports its health figures; the answer says which item tokens it
    must refuse from now on."""
    server = ProcessServer.objects.select_related("vault").filter(pk=pk).first()
    if server is None or not agent_services.process_server_token_valid(server=server, token=_bearer(request)):
        raise PermissionDenied("Unknown process server or wrong token.", code="bad_token")
    return Response(agent_services.process_server_heartbeat(server=server, report=_validated(PsHeartbeatSerializer, request)))


@extend_schema(request=PsUploadedSerializer, responses=inline_serializer("ProcessServerUploadedAnswer", {
    "woken": serializers.IntegerField(help_text="Items sent an apply pass now (the others have one running, which "
                                                "runs again when it ends, or are not this server's to report).")}),
    auth=AGENT_AUTH, tags=["processServers"])
@api_view(["POST"])
@authentication_classes([])
@permission_classes([AllowAny])
def process_server_uploaded(request, pk):
    """A process server says which items it has just put replication logs into storage
    for: each gets an apply pass now instead of at the next sweep (replication/engine.py).
    Items it does not serve are ignored."""
    server = ProcessServer.objects.select_related("vault").filter(pk=pk).first()
    if server is None or not agent_services.process_server_token_valid(server=server, token=_bearer(request)):
        raise PermissionDenied("Unknown process server or wrong token.", code="bad_token")
    items = _validated(PsUploadedSerializer, request)["items"]
    return Response({"woken": apply_wake(items, process_server_id=server.pk)})
