from functools import cached_property

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.exceptions import ValidationFailed
from core.validators import single_line
from recovery_plans import services
from recovery_plans.choices import PlanState
from recovery_plans.models import (
    SCRIPT_TIMEOUT_DEFAULT_SECONDS,
    SCRIPT_TIMEOUT_MAX_SECONDS,
    SCRIPT_TIMEOUT_MIN_SECONDS,
    PlanRecoveryPoint,
    RecoveredVm,
    RecoveryPlan,
    RecoveryPlanAction,
    RecoveryPlanGroup,
    RecoveryPlanNetworkMapping,
)
from recovery_plans.services import POINT_CHOICES, POINT_HELP
from replication.api.serializers import ProtectedItemSerializer
from replication.models import ProtectedItem


class ActionSerializer(serializers.ModelSerializer):
    order = serializers.IntegerField(
        required=False, min_value=1, help_text="Position among the group's actions of the same phase; default: as listed."
    )
    # The range is the model's rule (checked by the service, with a sentence).
    timeout_seconds = serializers.IntegerField(
        required=False, default=SCRIPT_TIMEOUT_DEFAULT_SECONDS,
        help_text=f"For a script action: seconds it may run ({SCRIPT_TIMEOUT_MIN_SECONDS}-{SCRIPT_TIMEOUT_MAX_SECONDS}).",
    )

    class Meta:
        model = RecoveryPlanAction
        fields = ["phase", "order", "kind", "name", "script", "timeout_seconds", "instructions"]
        # the service says what a blank name misses; a name is one line (issue 16)
        extra_kwargs = {"name": {"allow_blank": True, "validators": [single_line]}}


class GroupSerializer(serializers.ModelSerializer):
    order = serializers.IntegerField(
        required=False, min_value=1, help_text="The group's place in the plan (groups fail over in this order); "
        "default: as listed. Stored renumbered 1, 2, 3, ..."
    )
    items = serializers.PrimaryKeyRelatedField(
        many=True, queryset=ProtectedItem.objects.all(), required=False,
        help_text="Protected items of the plan's vault; each in one group of the plan only.",
    )
    actions = ActionSerializer(many=True, required=False)

    class Meta:
        model = RecoveryPlanGroup
        fields = ["order", "name", "items", "actions"]
        extra_kwargs = {"name": {"validators": [single_line]}}


class NetworkMappingSerializer(serializers.ModelSerializer):
    class Meta:
        model = RecoveryPlanNetworkMapping
        fields = ["site", "recovery_network", "test_network"]
        validators = []  # one mapping per site is checked by the service, with a sentence


class PlanItemStateSerializer(serializers.Serializer):
    item = serializers.UUIDField(source="item.pk")
    name = serializers.CharField(source="item.name")
    group = serializers.IntegerField(source="group.order")
    protection_state = serializers.CharField(source="item.protection_state")
    test_failover_state = serializers.CharField(source="item.test_failover_state")
    recovery_network = serializers.CharField(source="recovery_network.name", allow_null=True, default=None,
                                             help_text="The network a failover puts the VM on.")
    test_network = serializers.CharField(source="test_network.name", allow_null=True, default=None,
                                         help_text="The network a test failover puts the VM on.")
    problems = serializers.ListField(child=serializers.CharField(), help_text="What stops this item from failing over.")


class RecoveryPlanSerializer(serializers.ModelSerializer):
    """A plan with its groups in order, their pre- and post-actions and the plan's defaults.

    PUT / PATCH with ``groups`` replaces all of them (to move an item or reorder groups,
    send the groups as they should be); ``network_mappings`` likewise. Every check runs
    before anything is written: a refused change leaves the plan as it was.
    """

    groups = GroupSerializer(many=True, required=False)
    network_mappings = NetworkMappingSerializer(
        many=True, required=False,
        help_text="Per recovery site: the networks the plan's VMs go on there (empty: each item's own mapping).",
    )
    state = serializers.SerializerMethodField(help_text=f"One of {', '.join(PlanState.values)}.")
    state_description = serializers.SerializerMethodField()
    problems = serializers.SerializerMethodField(help_text="What stops the plan from failing over as a whole.")
    item_states = serializers.SerializerMethodField()

    class Meta:
        model = RecoveryPlan
        fields = [
            "id", "vault", "name", "description", "recovery_point_type", "network_mappings", "groups", "state",
            "state_description", "problems", "item_states", "created_at", "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
        # the service says what a blank name misses; a name is one line (issue 16)
        extra_kwargs = {"name": {"allow_blank": True, "validators": [single_line]}}
        # A duplicate name is a conflict (409), said by the service, not a 400.
        validators = []

    def _status(self, plan) -> services.PlanStatus:
        cache = self.context.setdefault("plan_status", {})
        if plan.pk not in cache:
            cache[plan.pk] = services.recovery_plan_status(plan=plan)
        return cache[plan.pk]

    def get_state(self, plan) -> str:
        return self._status(plan).state

    def get_state_description(self, plan) -> str:
        return self._status(plan).label

    def get_problems(self, plan) -> list[str]:
        return self._status(plan).problems

    @extend_schema_field(PlanItemStateSerializer(many=True))
    def get_item_states(self, plan):
        return PlanItemStateSerializer(self._status(plan).items, many=True).data

    def create(self, validated_data):
        return services.recovery_plan_create(
            vault=validated_data["vault"], name=validated_data["name"], description=validated_data.get("description", ""),
            recovery_point_type=validated_data.get("recovery_point_type", PlanRecoveryPoint.LATEST),
            groups=validated_data.get("groups", []), network_mappings=validated_data.get("network_mappings", []),
            user=self.context["request"].user,
        )

    def update(self, instance, validated_data):
        vault = validated_data.pop("vault", None)
        if vault is not None and vault.pk != instance.vault_id:
            raise ValidationFailed("A recovery plan cannot move to another vault; create one there instead.",
                                   extra={"fields": {"vault": ["cannot change"]}})
        return services.recovery_plan_update(plan=instance, **validated_data)

    def to_representation(self, instance):
        # Answer from one fresh read with everything prefetched (a write leaves stale caches).
        if not hasattr(instance, "_prefetched_objects_cache") or not instance._prefetched_objects_cache:
            instance = services.recovery_plans_for_vault().get(pk=instance.pk)
        return super().to_representation(instance)


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

    # A list's items share this serializer (the child of its ListSerializer): one serializer
    # of recovered VMs serves them all (building one binds and copies all its fields), and
    # each item's VMs are read once for the three fields that show them.
    @cached_property
    def _vm_serializer(self) -> RecoveredVmSerializer:
        return RecoveredVmSerializer(context=self.context)

    def _vms(self, obj) -> list[RecoveredVm]:
        seen = getattr(self, "_vms_seen", None)
        if seen is None or seen[0] is not obj:
            seen = self._vms_seen = (obj, list(obj.recovered_vms.all()))  # prefetched by the viewset, newest first
        return seen[1]

    def _current(self, obj, kind: str):
        vm = next((v for v in self._vms(obj) if v.kind == kind and v.removed_at is None), None)
        return self._vm_serializer.to_representation(vm) if vm is not None else None

    @extend_schema_field(RecoveredVmSerializer(many=True))
    def get_recoveredVms(self, obj):
        return [self._vm_serializer.to_representation(vm) for vm in self._vms(obj)]

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
