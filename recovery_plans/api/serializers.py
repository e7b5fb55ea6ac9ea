from django.db import IntegrityError, transaction
from rest_framework import serializers

from core.exceptions import Conflict
from recovery_plans.models import RecoveryPlan, RecoveryPlanAction, RecoveryPlanGroup
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
