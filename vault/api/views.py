from __future__ import annotations

from django.db.models import Prefetch
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from core.api import accepted_job
from core.api_views import JobSerializer
from core.exceptions import NotFound, ValidationFailed
from core import access
from core.permissions import VaultRole, VaultScoped
from replication.models import ProtectedItem
from replication.process_servers import process_server_config
from vault import filters, roles, services
from vault.api import serializers as s
from vault.discovery import vcenter_discover
from vault.models import (
    Alert,
    ConfigurationServer,
    DiscoveredMachine,
    Event,
    MasterTargetServer,
    ProcessServer,
    RecoveryNetwork,
    RecoverySite,
    ReplicationPolicy,
    RoleAssignment,
    Vault,
    VCenter,
)
from vault.simulation import machine_set_workload


class VaultViewSet(VaultScoped, viewsets.ModelViewSet):
    """vaults: Recovery Services vaults (a user sees those they hold a role on)."""

    vault_path = "pk"
    superuser_creates = ("Only an administrator (a superuser) creates vaults; ask one to create it and give you a role "
                         "on it.")
    queryset = Vault.objects.all()
    serializer_class = s.VaultSerializer
    permission_classes = [VaultRole]
    filterset_fields = ["name"]


    def perform_destroy(self, instance):
        services.vault_delete(vault=instance)  # 409 while it protects machines


class PolicyViewSet(VaultScoped, viewsets.ModelViewSet):
    """replicationPolicies: RPO threshold, retention and snapshot frequency."""

    queryset = ReplicationPolicy.objects.select_related("vault")
    serializer_class = s.PolicySerializer
    permission_classes = [VaultRole]
    filterset_class = filters.PolicyFilter

    def perform_destroy(self, instance):
        services.policy_delete(policy=instance)


class ConfigurationServerViewSet(VaultScoped, viewsets.ReadOnlyModelViewSet):
    queryset = ConfigurationServer.objects.all()
    serializer_class = s.ConfigurationServerSerializer
    permission_classes = [VaultRole]
    filterset_fields = ["vault"]


class ProcessServerViewSet(VaultScoped, mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    """processServers: receive replication data from mobility agents."""

    role_actions = {"configuration": access.VIEW_SENSITIVE}
    queryset = ProcessServer.objects.all()
    serializer_class = s.ProcessServerSerializer
    permission_classes = [VaultRole]
    filterset_class = filters.ProcessServerFilter

    @extend_schema(request=None, responses={200: dict})
    @action(detail=True, methods=["get"])
    def configuration(self, request, pk=None):
        """The process server's configuration file (keys included): Operators and above (never
        Readers)."""
        response = Response(process_server_config(server=self.get_object()))
        response["Cache-Control"] = "no-store"  # keys: never kept by a proxy or browser cache
        return response


class MasterTargetServerViewSet(VaultScoped, mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    queryset = MasterTargetServer.objects.all()
    serializer_class = s.MasterTargetServerSerializer
    permission_classes = [VaultRole]
    filterset_fields = ["vault", "site"]


class VCenterViewSet(VaultScoped, viewsets.ModelViewSet):
    """replicationvCenters: VMware endpoints added to the vault."""

    role_actions = {"discover": access.OPERATE}
    queryset = VCenter.objects.all()
    serializer_class = s.VCenterSerializer
    permission_classes = [VaultRole]
    filterset_class = filters.VCenterFilter

    def perform_destroy(self, instance):
        services.vcenter_delete(vcenter=instance)  # 409 while its machines are protected

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"])
    def discover(self, request, pk=None):
        """Start a discovery job; poll the job (Location header) for its outcome."""
        job = vcenter_discover(vcenter=self.get_object(), user=request.user)
        return accepted_job(request, job, JobSerializer)


class MachineViewSet(VaultScoped, viewsets.ReadOnlyModelViewSet):
    """replicationProtectableItems: machines discovered or registered by their agents."""

    role_actions = {"workload": access.OPERATE}
    queryset = DiscoveredMachine.objects.prefetch_related(
        "disks", Prefetch("protected_items", queryset=ProtectedItem.objects.only("id", "machine_id"))
    )
    serializer_class = s.MachineSerializer
    permission_classes = [VaultRole]
    filterset_class = filters.MachineFilter
    ordering_fields = ["name", "last_seen_at"]

    @extend_schema(request=s.WorkloadSerializer, responses=s.WorkloadSerializer)
    @action(detail=True, methods=["post"])
    def workload(self, request, pk=None):
        """Change how fast a simulated-site VM writes (the demo's churn); 400 for real machines."""
        machine = self.get_object()  # the role is checked before the body
        data = s.WorkloadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        machine_set_workload(machine=machine, **data.validated_data)
        return Response(data.validated_data)


class EventViewSet(VaultScoped, viewsets.ReadOnlyModelViewSet):
    """replicationEvents: what happened, newest first."""

    queryset = Event.objects.all()
    serializer_class = s.EventSerializer
    permission_classes = [VaultRole]
    filterset_class = filters.EventFilter


class AlertViewSet(VaultScoped, viewsets.ReadOnlyModelViewSet):
    """replicationAlerts: problems going on (or resolved), to acknowledge."""

    role_actions = {"acknowledge": access.OPERATE}
    queryset = Alert.objects.all()
    serializer_class = s.AlertSerializer
    permission_classes = [VaultRole]
    filterset_class = filters.AlertFilter

    @extend_schema(request=None, responses=s.AlertSerializer)
    @action(detail=True, methods=["post"])
    def acknowledge(self, request, pk=None):
        alert = services.alert_acknowledge(alert=self.get_object(), user=request.user)
        return Response(s.AlertSerializer(alert).data)


class RecoverySiteViewSet(VaultScoped, viewsets.ModelViewSet):
    """recoverySites: where failed-over VMs run, with their networks (recovery and test).

    Deleting a site that an item is mapped to, or where a recovered VM runs, is 409.
    """

    queryset = RecoverySite.objects.select_related("vault").prefetch_related("networks")
    serializer_class = s.RecoverySiteSerializer
    permission_classes = [VaultRole]
    filterset_fields = ["vault", "kind"]

    def perform_destroy(self, instance):
        services.recovery_site_delete(site=instance)

    @extend_schema(methods=["GET"], request=None, responses=s.RecoveryNetworkSerializer(many=True))
    @extend_schema(methods=["POST"], request=s.RecoveryNetworkSerializer, responses={201: s.RecoveryNetworkSerializer})
    @action(detail=True, methods=["get", "post"], url_path="networks", pagination_class=None)
    def networks(self, request, pk=None):
        """The site's networks; POST adds one ({name, purpose: RECOVERY|TEST})."""
        site = self.get_object()
        if request.method == "GET":
            return Response(s.RecoveryNetworkSerializer(site.networks.all(), many=True).data)
        data = s.RecoveryNetworkSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        network = services.recovery_network_create(site=site, **data.validated_data)
        return Response(s.RecoveryNetworkSerializer(network).data, status=201)

    @extend_schema(request=None, responses={204: None})
    @action(detail=True, methods=["delete"], url_path=r"networks/(?P<network_id>[0-9]+)")
    def delete_network(self, request, pk=None, network_id=None):
        """Remove a network (not the last of its purpose, nor one an item is mapped to)."""
        site = self.get_object()
        network = RecoveryNetwork.objects.filter(site=site, pk=network_id).first()
        if network is None:
            raise NotFound(f"The recovery site {site.name} has no network {network_id}.")
        services.recovery_network_delete(network=network)
        return Response(status=204)


class RoleAssignmentViewSet(VaultScoped, mixins.CreateModelMixin, mixins.DestroyModelMixin, viewsets.ReadOnlyModelViewSet):
    """roleAssignments: who holds which role on a vault (Owner, Contributor, Operator, Reader;
    see ``vault.roles``). Owners only: reading them too. POST gives a ``user`` or a ``group``
    (by name) a role (replacing the one they held); DELETE takes it away. The last owner of a
    vault cannot be removed or demoted (409)."""

    queryset = RoleAssignment.objects.select_related("vault", "user", "group")
    serializer_class = s.RoleAssignmentSerializer
    permission_classes = [VaultRole]
    filterset_fields = ["vault", "role"]
    unsafe_action = access.ACCESS
    role_actions = {"list": access.ACCESS, "retrieve": access.ACCESS}

    def get_queryset(self):
        queryset = super().get_queryset()
        if self.request.user.is_superuser or self.action != "list":
            return queryset  # one assignment: its vault's role is checked (403 with a sentence)
        owned = [v for v in (access.visible_vault_ids(self.request.user) or set())
                 if access.can(self.request.user, v, access.ACCESS)]
        return queryset.filter(vault__in=owned)

    def perform_create(self, serializer):
        data = serializer.validated_data
        user, group = (data.get("user") or {}).get("username"), (data.get("group") or {}).get("name")
        if bool(user) == bool(group):
            raise ValidationFailed("Give the role to a user or to a group: one of them.",
                                   extra={"fields": {"user": ["a user name, or a group name in group"]}})
        serializer.instance = roles.role_assign(
            vault=data["vault"], role=data["role"], user=roles.find_user(user) if user else None,
            group=roles.find_group(group) if group else None, by=self.request.user)

    def perform_destroy(self, instance):
        roles.role_remove(assignment=instance)
