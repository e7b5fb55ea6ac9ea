from __future__ import annotations

from rest_framework import viewsets

from core.permissions import ReadOrAdmin
from replication.api.serializers import ProtectedItemSerializer, RecoveryPointSerializer
from replication.filters import ProtectedItemFilter, RecoveryPointFilter
from replication.models import ProtectedItem, RecoveryPoint


class ProtectedItemViewSet(viewsets.ReadOnlyModelViewSet):
    """replicationProtectedItems: replicated VMs with their state, health and RPO."""

    queryset = ProtectedItem.objects.select_related("machine", "policy", "process_server").prefetch_related("replica_disks")
    serializer_class = ProtectedItemSerializer
    permission_classes = [ReadOrAdmin]
    filterset_class = ProtectedItemFilter
    ordering_fields = ["name", "rpo_seconds", "health", "protection_state", "created_at"]


class RecoveryPointViewSet(viewsets.ReadOnlyModelViewSet):
    """recoveryPoints: points in time an item can be recovered to, newest first."""

    queryset = RecoveryPoint.objects.all()
    serializer_class = RecoveryPointSerializer
    permission_classes = [ReadOrAdmin]
    filterset_class = RecoveryPointFilter
