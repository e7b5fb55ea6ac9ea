from __future__ import annotations

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from core.api import accepted_job
from core.api_views import JobSerializer
from core.exceptions import NotFound
from core import access
from core.permissions import VaultRole, VaultScoped
from replication import agents as agent_services
from replication import services
from replication.api.serializers import (
    ChangeProcessServerSerializer,
    EnableReplicationSerializer,
    ProtectedItemSerializer,
    RecoveryPointSerializer,
    RecoverySettingsSerializer,
)
from replication.engine import disk_image_stream
from replication.filters import ProtectedItemFilter, RecoveryPointFilter
from replication.models import ProtectedItem, RecoveryPoint


class ProtectedItemViewSet(VaultScoped, mixins.CreateModelMixin, mixins.DestroyModelMixin, viewsets.ReadOnlyModelViewSet):
    """replicationProtectedItems: replicated VMs with their state, health and RPO.

    POST enables replication (202 + the job), DELETE disables it (202 + the job).
    """

    unsafe_action = access.OPERATE  # enable, disable, resync, recovery mapping, recovery, failback
    # The recovery site and its networks come in queries of their own: each table joined
    # into a list's query multiplies PostgreSQL's planning (eight tables took 15-20 ms to
    # plan, against under a millisecond to run, at 10,000 items).
    queryset = ProtectedItem.objects.select_related("machine", "policy", "process_server").prefetch_related(
        "replica_disks", "recovery_site", "recovery_network", "test_network")
    serializer_class = ProtectedItemSerializer
    permission_classes = [VaultRole]
    filterset_class = ProtectedItemFilter
    ordering_fields = ["name", "rpo_seconds", "health", "protection_state", "created_at"]

    @extend_schema(request=EnableReplicationSerializer, responses={202: JobSerializer})
    def create(self, request, *args, **kwargs):
        """Enable replication of a discovered machine (one job per machine)."""
        s = EnableReplicationSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        _, job = services.protected_item_enable(user=request.user, **s.validated_data)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=RecoverySettingsSerializer, responses=ProtectedItemSerializer)
    def partial_update(self, request, *args, **kwargs):
        """Choose where the item is recovered: recovery_site and its network mapping."""
        item = self.get_object()
        s = RecoverySettingsSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        item = services.protected_item_set_recovery(item=item, **s.validated_data)
        return Response(self.get_serializer(self.get_queryset().get(pk=item.pk)).data)

    @extend_schema(request=None, responses={202: JobSerializer})
    def destroy(self, request, *args, **kwargs):
        """Disable replication: stops it and removes the replica data (a job)."""
        _, job = services.protected_item_disable(item=self.get_object(), user=request.user)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="repairReplication")
    def repair_replication(self, request, pk=None):
        """Resynchronize now: an item that needs it (otherwise that runs in the off-hours window),
        or a protected item whose replica is in doubt (every block is compared with the source)."""
        _, job = services.protected_item_resync(item=self.get_object(), user=request.user)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=None, responses=inline_serializer("ItemTokenRotated", {
        "id": serializers.UUIDField(), "token_generation": serializers.IntegerField(),
        "message": serializers.CharField()}))
    @action(detail=True, methods=["post"], url_path="rotateToken")
    def rotate_token(self, request, pk=None):
        """Rotate the item's token: process servers refuse the previous one (401) from their
        next heartbeat, and the agent takes the new one with its next assignment. Takes the
        role that manages the vault's infrastructure."""
        item = self.get_object()
        access.require(request.user, item.vault_id, access.MANAGE)
        item = agent_services.protected_item_rotate_token(item=item, user=request.user)
        return Response({"id": str(item.pk), "token_generation": item.token_generation,
                         "message": "Process servers refuse the previous item token from their next heartbeat; "
                                    "the agent takes the new one with its next assignment."})

    @extend_schema(request=ChangeProcessServerSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="changeProcessServer")
    def change_process_server(self, request, pk=None):
        """Switch process server: the item's agent sends to another process server of the vault,
        going on from where the replication stream stands (nothing is copied again). A job: the
        old server uploads what it acknowledged first."""
        item = self.get_object()  # the role check first: a Reader learns nothing of the body
        s = ChangeProcessServerSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        _, job = services.protected_item_change_process_server(item=item, user=request.user, **s.validated_data)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="retryEnableProtection")
    def retry_enable(self, request, pk=None):
        """Enable replication again after it failed."""
        _, job = services.protected_item_enable_retry(item=self.get_object(), user=request.user)
        return accepted_job(request, job, JobSerializer)


def image_filename(*, item, point, disk_index: int) -> str:
    """The download's file name: ids and a time only. A name never becomes part of a path or
    a header (a VM name may hold quotes, slashes or line breaks)."""
    return f"{item.pk}-disk{disk_index}-{point.time:%Y%m%dT%H%M%S}.img"


class RecoveryPointViewSet(VaultScoped, viewsets.ReadOnlyModelViewSet):
    """recoveryPoints: points in time an item can be recovered to, newest first."""

    vault_path = "item__vault"
    role_actions = {"image": access.VIEW_SENSITIVE}
    queryset = RecoveryPoint.objects.all()
    serializer_class = RecoveryPointSerializer
    permission_classes = [VaultRole]
    filterset_class = RecoveryPointFilter

    @extend_schema(
        responses={(200, "application/octet-stream"): OpenApiResponse(response=OpenApiTypes.BINARY, description="The disk's raw bytes as of the point.")},
    )
    @action(detail=True, methods=["get"], url_path=r"disks/(?P<disk>\d+)/image")
    def image(self, request, pk=None, disk=None):
        """Stream a replica disk's raw bytes as of this recovery point."""
        point = self.get_object()
        item = ProtectedItem.objects.select_related("vault").prefetch_related("replica_disks").get(pk=point.item_id)
        replica = next((d for d in item.replica_disks.all() if d.index == int(disk)), None)
        if replica is None:
            raise NotFound(f"{item.name} has no disk {disk}.")
        size, chunks = disk_image_stream(item=item, point=point, disk_index=replica.index)
        response = StreamingHttpResponse(chunks, content_type="application/octet-stream")
        response["Content-Length"] = str(size)
        response["Content-Disposition"] = f'attachment; filename="{image_filename(item=item, point=point, disk_index=replica.index)}"'
        response["Cache-Control"] = "no-store"  # a whole disk: no proxy or browser cache keeps it
        return response
