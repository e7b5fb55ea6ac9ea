"""What administrators do with mobility agents: ``agents`` (revoke, rotateToken) and
``agentRegistrations`` (approve, reject the registrations that wait for them).

Both are infrastructure of a vault: seeing them takes a role on the vault, acting on them
the role that manages its infrastructure (``core.access.MANAGE``).
"""
from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from core import access
from core.permissions import VaultRole, VaultScoped
from replication import agents as agent_services
from replication.filters import AgentRegistrationFilter, MobilityAgentFilter
from replication.models import AgentRegistration, MobilityAgent


class MobilityAgentSerializer(serializers.ModelSerializer):
    machine_name = serializers.CharField(source="machine.name", read_only=True)

    class Meta:
        model = MobilityAgent
        fields = ["id", "vault", "machine", "machine_name", "hostname", "version", "pushed", "disks",
                  "last_heartbeat_at", "token_generation", "rotating", "created_at"]
        read_only_fields = fields


class AgentRegistrationSerializer(serializers.ModelSerializer):
    machine_name = serializers.CharField(source="machine.name", read_only=True)
    decided_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = AgentRegistration
        fields = ["id", "vault", "machine", "machine_name", "hostname", "version", "report", "remote_addr", "state",
                  "created_at", "decided_at", "decided_by"]
        read_only_fields = fields


class AgentViewSet(VaultScoped, viewsets.ReadOnlyModelViewSet):
    """agents: the mobility agents registered with the vault. ``revoke`` shuts one out at once
    (with its items' tokens); ``rotateToken`` gives it and its items new tokens, which it
    takes with its next assignment."""

    role_actions = {"revoke": access.MANAGE, "rotate_token": access.MANAGE}
    queryset = MobilityAgent.objects.select_related("machine", "vault").order_by("hostname", "id")
    serializer_class = MobilityAgentSerializer
    permission_classes = [VaultRole]
    filterset_class = MobilityAgentFilter

    @extend_schema(request=None, responses=MobilityAgentSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        """Revoke the agent's token and its items' tokens: it is refused at once (the process
        servers refuse the item tokens from their next heartbeat) until it registers again
        and an administrator approves that registration."""
        agent = agent_services.agent_revoke(agent=self.get_object(), user=request.user)
        return Response(self.get_serializer(agent).data)

    @extend_schema(request=None, responses=MobilityAgentSerializer)
    @action(detail=True, methods=["post"], url_path="rotateToken")
    def rotate_token(self, request, pk=None):
        """New tokens for the agent and its items; the agent takes them with its next
        assignment, and its previous token stops working once it uses the new one."""
        agent = agent_services.agent_rotate(agent=self.get_object(), user=request.user)
        return Response(self.get_serializer(agent).data)


class AgentRegistrationViewSet(VaultScoped, viewsets.ReadOnlyModelViewSet):
    """agentRegistrations: registrations for machines that have an agent already, made
    without that agent's token. ``approve`` makes the registering agent the machine's agent
    (the previous agent's tokens stop working); ``reject`` gives it nothing."""

    role_actions = {"approve": access.MANAGE, "reject": access.MANAGE}
    queryset = AgentRegistration.objects.select_related("machine", "vault", "decided_by")
    serializer_class = AgentRegistrationSerializer
    permission_classes = [VaultRole]
    filterset_class = AgentRegistrationFilter

    @extend_schema(request=None, responses=AgentRegistrationSerializer)
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        """Approve a pending registration (409 if it was decided already)."""
        registration = agent_services.agent_registration_approve(registration_id=self.get_object().pk,
                                                                 user=request.user)
        return Response(self.get_serializer(registration).data)

    @extend_schema(request=None, responses=AgentRegistrationSerializer)
    @action(detail=True, methods=["post"])
    def reject(self, request, pk=None):
        """Reject a pending registration (409 if it was decided already)."""
        registration = agent_services.agent_registration_reject(registration_id=self.get_object().pk,
                                                                user=request.user)
        return Response(self.get_serializer(registration).data)

