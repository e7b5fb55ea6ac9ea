from django.db import IntegrityError, transaction
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.exceptions import Conflict
from recovery_plans.models import RecoveredVm, RecoveryPlan, RecoveryPlanAction, RecoveryPlanGroup
from recovery_plans.services import POINT_CHOICES, POINT_HELP
from replication.api.serializers import ProtectedItemSerializer
from replication.models import ProtectedItem


class ActionSerializer(serializers.ModelSerializer):
    class Meta:
        model = RecoveryPlanAction
        fields = ["phase", "order", "kind", "name", "script", "instructions"]

    def validate(self, attrs):
        if attrs["kind"] == "SCRIPT" and not attrs.get("script"):
            raise serializers.ValidationError({"script": "A script action needs the command to run."})
        if attrs["kind"] == "MANUAL" and not attrs.get("instructions"):
            raise serializers.ValidationError({"instructions": "A manual action needs instructions for the admin."})
        return attrs


class GroupSerializer(serializers.ModelSerializer):
    items = serializers.PrimaryKeyRelatedField(many=True, queryset=ProtectedItem.objects.all())
    actions = ActionSerializer(many=True, required=False)

    class Meta:
        model = RecoveryPlanGroup
        fields = ["order", "name", "items", "actions"]


class RecoveryPlanSerializer(serializers.ModelSerializer):
    groups = GroupSerializer(many=True, required=False)

    class Meta:
        model = RecoveryPlan
        fields = ["id", "vault", "name", "description", "groups", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
        # A duplicate name is a conflict (409), checked in validate(), not a 400.
        validators = []

    def validate(self, attrs):
        vault = attrs.get("vault") or getattr(self.instance, "vault", None)
        name = attrs.get("name", getattr(self.instance, "name", None))
        same_name = RecoveryPlan.objects.filter(vault=vault, name=name)
        if self.instance is not None:
            same_name = same_name.exclude(pk=self.instance.pk)
        if same_name.exists():
            raise Conflict(f"A recovery plan named '{name}' already exists in this vault.")
        groups = attrs.get("groups", [])
        orders = [g["order"] for g in groups]
        if len(orders) != len(set(orders)):
            raise serializers.ValidationError({"groups": "Each group needs its own order number."})
        seen = set()
        for g in groups:
            for item in g["items"]:
                if item.vault_id != vault.pk:
                    raise serializers.ValidationError({"groups": f"'{item.name}' belongs to another vault."})
                if item.pk in seen:
                    raise serializers.ValidationError({"groups": f"'{item.name}' is in more than one group."})
                seen.add(item.pk)
        return attrs

    def _write_groups(self, plan, groups):
        plan.groups.all().delete()
        for g in groups:
            items, actions = g.pop("items"), g.pop("actions", [])
            group = RecoveryPlanGroup.objects.create(plan=plan, **g)
            group.items.set(items)
            RecoveryPlanAction.objects.bulk_create([RecoveryPlanAction(group=group, **a) for a in actions])

    def create(self, validated_data):
        groups = validated_data.pop("groups", [])
        try:
            with transaction.atomic():
                plan = RecoveryPlan.objects.create(**validated_data)
                self._write_groups(plan, groups)
        except IntegrityError:
            raise Conflict(f"A recovery plan named '{validated_data['name']}' already exists in this vault.") from None
        return plan

    def update(self, instance, validated_data):
        groups = validated_data.pop("groups", None)
        validated_data.pop("vault", None)
        with transaction.atomic():
            for k, v in validated_data.items():
                setattr(instance, k, v)
            instance.save()
            if groups is not None:
                self._write_groups(instance, groups)
        return instance


# --- recovery of one item -------------------------------------------------------------------


class RecoveredDiskSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    size_bytes = serializers.IntegerField()
    digest = serializers.CharField(help_text="Read back from the recovery site; equal to the replica's at the point.")
    method = serializers.CharField(help_text="How the disk was built: clone, sparse-copy, upload or server-copy.")
    location = serializers.CharField()


class RecoveredVmSerializer(serializers.ModelSerializer):
    site_name = serializers.CharField(source="site.name", read_only=True)
    network_name = serializers.CharField(source="network.name", read_only=True)
    disks = RecoveredDiskSerializer(many=True, read_only=True)
    disks_verified = serializers.IntegerField(read_only=True)
    # The recovery point's type, as recoveryPoints/ gives it (a plain string here, so that the
    # schema keeps one enum for the point types).
    point_type = serializers.CharField(read_only=True, help_text="crash_consistent or app_consistent")

    class Meta:
        model = RecoveredVm
        fields = [
            "id", "kind", "name", "vm_id", "site", "site_name", "network", "network_name", "power_state", "point_id",
            "point_time", "point_type", "disks", "disks_verified", "verified_bytes", "created_at", "removed_at",
            "cleanup_notes",
        ]
        read_only_fields = fields


class ProtectedItemRecoverySerializer(ProtectedItemSerializer):
    """A protected item with the VMs recovered from it."""

    recoveredVms = serializers.SerializerMethodField(help_text="Every VM recovered from the item, newest first.")
    testFailoverVm = serializers.SerializerMethodField(help_text="The test VM of the drill under way, if any.")
    failoverVm = serializers.SerializerMethodField(help_text="The failed-over VM, if any.")

    class Meta(ProtectedItemSerializer.Meta):
        fields = [*ProtectedItemSerializer.Meta.fields, "recoveredVms", "testFailoverVm", "failoverVm"]
        read_only_fields = fields

    def _vms(self, obj) -> list[RecoveredVm]:
        return list(obj.recovered_vms.all())  # prefetched by the viewset, newest first

    def _current(self, obj, kind: str):
        vm = next((v for v in self._vms(obj) if v.kind == kind and v.removed_at is None), None)
        return RecoveredVmSerializer(vm).data if vm is not None else None

    @extend_schema_field(RecoveredVmSerializer(many=True))
    def get_recoveredVms(self, obj):
        return RecoveredVmSerializer(self._vms(obj), many=True).data

    @extend_schema_field(RecoveredVmSerializer(allow_null=True))
    def get_testFailoverVm(self, obj):
        return self._current(obj, "TEST")

    @extend_schema_field(RecoveredVmSerializer(allow_null=True))
    def get_failoverVm(self, obj):
        return self._current(obj, "FAILOVER")


class RecoveryPointChoiceSerializer(serializers.Serializer):
    recoveryPoint = serializers.ChoiceField(choices=list(POINT_CHOICES), default="latest", help_text=POINT_HELP)
    recoveryPointId = serializers.CharField(
        required=False, allow_blank=True, max_length=64,
        help_text="For a custom point: the id of one of the item's recovery points (recoveryPoints/).",
    )


class NetworkChoiceMixin(serializers.Serializer):
    network = serializers.CharField(
        required=False, allow_blank=True, max_length=255,
        help_text="A network of the item's recovery site, by id or name; default: the item's mapped network.",
    )


class TestFailoverSerializer(RecoveryPointChoiceSerializer, NetworkChoiceMixin):
    """Test failover (DR drill) into an isolated TEST network."""


class TestFailoverCleanupSerializer(serializers.Serializer):
    comments = serializers.CharField(required=False, allow_blank=True, default="", max_length=4000,
                                     help_text="Notes on the drill, kept with the removed test VM.")


class PlannedFailoverSerializer(NetworkChoiceMixin):
    """Planned failover: shut the source down, replicate its last writes, recover from a point after them."""


class UnplannedFailoverSerializer(RecoveryPointChoiceSerializer, NetworkChoiceMixin):
    shutDownSource = serializers.BooleanField(default=True, help_text="Shut the source VM down first if it can be reached.")


class ApplyRecoveryPointSerializer(RecoveryPointChoiceSerializer):
    """Change recovery point of a failed-over VM."""
