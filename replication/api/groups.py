"""replicationGroups: multi-VM consistency groups and their shared recovery points."""
from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from core import access
from core.permissions import VaultRole, VaultScoped
from core.validators import single_line
from replication import groups
from replication.models import GroupRecoveryPoint, ProtectedItem, ReplicationGroup
from vault.models import Vault


class GroupRecoveryPointSerializer(serializers.ModelSerializer):
    complete = serializers.SerializerMethodField(help_text="Every member has its point of this group point.")
    item_points = serializers.SerializerMethodField(help_text="Per member (protected item id), its recovery point's id.")

    class Meta:
        model = GroupRecoveryPoint
        fields = ["id", "group", "state", "members", "reason", "created_at", "complete", "item_points"]
        read_only_fields = fields

    def get_complete(self, obj: GroupRecoveryPoint) -> bool:
        return groups.group_point_complete(obj)

    def get_item_points(self, obj: GroupRecoveryPoint) -> dict[str, str]:
        return {str(item): str(pk) for pk, item in obj.item_points.values_list("pk", "item_id")}


class ReplicationGroupSerializer(serializers.ModelSerializer):
    vault = serializers.PrimaryKeyRelatedField(queryset=Vault.objects.all())
    items = serializers.PrimaryKeyRelatedField(
        source="members", many=True, queryset=ProtectedItem.objects.all(),
        help_text="The protected items that get shared recovery points (an item is in one group at most).",
    )

    class Meta:
        model = ReplicationGroup
        fields = ["id", "vault", "name", "items", "point_frequency_seconds", "last_point_requested_at", "created_at"]
        read_only_fields = ["id", "last_point_requested_at", "created_at"]
        extra_kwargs = {"name": {"validators": [single_line]}}


class ReplicationGroupViewSet(VaultScoped, viewsets.ModelViewSet):
    """replicationGroups: protected items whose recovery points are taken together (multi-VM
    consistency). POST/PATCH set the members (``items``); ``takePoint`` runs the barrier now."""

    role_actions = {"take_point": access.OPERATE}
    queryset = ReplicationGroup.objects.prefetch_related("members")
    serializer_class = ReplicationGroupSerializer
    permission_classes = [VaultRole]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = groups.replication_group_create(
            vault=data["vault"], name=data["name"], items=list(data["members"]),
            point_frequency_seconds=data.get("point_frequency_seconds", 300),
        )

    def perform_update(self, serializer):
        data = serializer.validated_data
        if "vault" in data and data["vault"].pk != serializer.instance.vault_id:
            raise serializers.ValidationError({"vault": "A replication group cannot move to another vault."})
        serializer.instance = groups.replication_group_update(
            group=serializer.instance, name=data.get("name"),
            items=list(data["members"]) if "members" in data else None,
            point_frequency_seconds=data.get("point_frequency_seconds"),
        )

    def perform_destroy(self, instance):
        groups.replication_group_delete(group=instance)

    @extend_schema(request=None, responses=GroupRecoveryPointSerializer(many=True))
    @action(detail=True, methods=["get"], url_path="points")
    def points(self, request, pk=None):
        """The group's shared points, newest first (complete: every member has its point)."""
        group = self.get_object()
        page = self.paginate_queryset(GroupRecoveryPoint.objects.filter(group=group))
        return self.get_paginated_response(GroupRecoveryPointSerializer(page, many=True).data)

    @extend_schema(request=None, responses={201: GroupRecoveryPointSerializer})
    @action(detail=True, methods=["post"], url_path="takePoint")
    def take_point(self, request, pk=None):
        """Take a shared point now: hold every member's writes, note their positions, bookmark
        each member there and release (abandoned if a member is not held in time)."""
        point = groups.group_point_take(group=self.get_object())
        return Response(GroupRecoveryPointSerializer(point).data, status=status.HTTP_201_CREATED)
