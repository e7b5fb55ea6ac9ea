from __future__ import annotations

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from core.api import accepted_job
from core.api_views import JobSerializer
from core.exceptions import NotFound
from core.permissions import ReadOrAdmin
from replication import services
from replication.api.serializers import (
    EnableReplicationSerializer,
    ProtectedItemSerializer,
    RecoveryPointSerializer,
    RecoverySettingsSerializer,
)
from replication.engine import disk_image_stream
from replication.filters import ProtectedItemFilter, RecoveryPointFilter
from replication.models import ProtectedItem, RecoveryPoint


class ProtectedItemViewSet(mixins.CreateModelMixin, mixins.DestroyModelMixin, viewsets.ReadOnlyModelViewSet):
    """replicationProtectedItems: replicated VMs with their state, health and RPO.

    POST enables replication (202 + the job), DELETE disables it (202 + the job).
    """

    queryset = ProtectedItem.objects.select_related(
        "machine", "policy", "process_server", "recovery_site", "recovery_network", "test_network"
    ).prefetch_related("replica_disks")
    serializer_class = ProtectedItemSerializer
    permission_classes = [ReadOrAdmin]
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


class RecoveryPointViewSet(viewsets.ReadOnlyModelViewSet):
    """recoveryPoints: points in time an item can be recovered to, newest first."""

    queryset = RecoveryPoint.objects.all()
    serializer_class = RecoveryPointSerializer
    permission_classes = [ReadOrAdmin]
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
