from __future__ import annotations

from rest_framework import serializers

from core.exceptions import Conflict
from vault import services
from vault.choices import MAX_RETENTION_HOURS
from vault.simulation import PATTERNS
from vault.models import (
    Alert,
    ConfigurationServer,
    DiscoveredDisk,
    DiscoveredMachine,
    Event,
    MasterTargetServer,
    RoleAssignment,
    ProcessServer,
    RecoveryNetwork,
    RecoverySite,
    ReplicationPolicy,
    Vault,
    VCenter,
)


class VaultSerializer(serializers.ModelSerializer):
    passphrase = serializers.CharField(
        write_only=True, required=False, min_length=services.MIN_PASSPHRASE_LENGTH, max_length=256,
        style={"input_type": "password"},
        help_text="Registration passphrase agents and servers use to join the vault; stored hashed, never returned.",
    )
    alert_emails = serializers.ListField(child=serializers.EmailField(), required=False, max_length=50)

    class Meta:
        model = Vault
        fields = [
            "id", "name", "description", "passphrase", "off_hours_start", "off_hours_end",
            "off_hours_time_zone", "alert_emails", "email_alerts_enabled", "created_at", "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    def validate(self, attrs):
        if self.instance is None and not attrs.get("passphrase"):
            raise serializers.ValidationError({"passphrase": "A registration passphrase is required."})
        return attrs

    def create(self, validated_data):
        return services.vault_create(**validated_data)

    def update(self, instance, validated_data):
        return services.vault_update(vault=instance, **validated_data)


class PolicySerializer(serializers.ModelSerializer):
    failback_policy = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)

    class Meta:
        model = ReplicationPolicy
        fields = [
            "id", "vault", "name", "storage_tier", "rpo_threshold_minutes", "recovery_point_retention_hours",
            "app_consistent_frequency_hours", "crash_consistent_frequency_seconds", "is_failback",
            "failback_policy", "created_at", "updated_at",
        ]
        read_only_fields = ["id", "is_failback", "failback_policy", "created_at", "updated_at"]
        # A duplicate name is a conflict (409), checked in validate(), not a 400.
        validators = []

    def get_fields(self):
        fields = super().get_fields()
        if self.instance is not None and not isinstance(self.instance, list):
            fields["vault"].read_only = True
        return fields

    def validate(self, attrs):
        tier = attrs.get("storage_tier", getattr(self.instance, "storage_tier", "standard"))
        retention = attrs.get("recovery_point_retention_hours", getattr(self.instance, "recovery_point_retention_hours", 24))
        vault = attrs.get("vault", getattr(self.instance, "vault", None))
        name = attrs.get("name", getattr(self.instance, "name", None))
        same_name = ReplicationPolicy.objects.filter(vault=vault, name=name)
        if self.instance is not None:
            same_name = same_name.exclude(pk=self.instance.pk)
        if vault is not None and same_name.exists():
            raise Conflict(f"A policy named '{name}' already exists in this vault.")
        limit = MAX_RETENTION_HOURS[tier]
        if retention > limit:
            raise serializers.ValidationError(
                {"recovery_point_retention_hours": f"{tier.capitalize()} storage keeps recovery points for at most {limit} hours."}
            )
        return attrs

    def create(self, validated_data):
        vault = validated_data.pop("vault")
        name = validated_data.pop("name")
        return services.policy_create(vault=vault, name=name, **validated_data)

    def update(self, instance, validated_data):
        validated_data.pop("vault", None)
        return services.policy_update(policy=instance, **validated_data)


class ConfigurationServerSerializer(serializers.ModelSerializer):
    class Meta:
        model = ConfigurationServer
        fields = ["id", "vault", "name", "host", "version", "last_heartbeat_at"]
        read_only_fields = fields


class ProcessServerSerializer(serializers.ModelSerializer):
    class Meta:
        model = ProcessServer
        fields = [
            "id", "vault", "name", "host", "data_port", "site", "thumbprint", "health", "health_reasons",
            "last_heartbeat_at", "cpu_percent", "memory_percent", "cache_free_bytes", "cache_total_bytes",
            "pending_upload_bytes", "created_at",
        ]
        read_only_fields = [
            "id", "thumbprint", "health", "health_reasons", "last_heartbeat_at", "cpu_percent", "memory_percent",
            "cache_free_bytes", "cache_total_bytes", "pending_upload_bytes", "created_at",
        ]

    def create(self, validated_data):
        return services.process_server_create(**validated_data)


class MasterTargetServerSerializer(serializers.ModelSerializer):
    class Meta:
        model = MasterTargetServer
        fields = ["id", "vault", "name", "host", "site", "last_heartbeat_at", "created_at"]
        read_only_fields = ["id", "last_heartbeat_at", "created_at"]

    def create(self, validated_data):
        return services.master_target_server_create(**validated_data)


class VCenterSerializer(serializers.ModelSerializer):
    password = serializers.CharField(
        write_only=True, required=False, max_length=512, style={"input_type": "password"},
        help_text="Stored encrypted; never returned.",
    )

    class Meta:
        model = VCenter
        fields = [
            "id", "vault", "name", "kind", "host", "port", "username", "password", "allow_untrusted", "thumbprint",
            "discovery_interval_minutes", "last_discovery_at", "last_discovery_error", "created_at",
        ]
        read_only_fields = ["id", "last_discovery_at", "last_discovery_error", "created_at"]

    def validate(self, attrs):
        if self.instance is None and not attrs.get("password"):
            raise serializers.ValidationError({"password": "A password is required."})
        return attrs

    def create(self, validated_data):
        return services.vcenter_create(**validated_data)

    def update(self, instance, validated_data):
        validated_data.pop("vault", None)
        return services.vcenter_update(vcenter=instance, **validated_data)


class DiskSerializer(serializers.ModelSerializer):
    class Meta:
        model = DiscoveredDisk
        fields = ["key", "label", "capacity_bytes", "backing_file", "datastore"]


class MachineSerializer(serializers.ModelSerializer):
    disks = DiskSerializer(many=True, read_only=True)
    protected_item = serializers.SerializerMethodField()

    class Meta:
        model = DiscoveredMachine
        fields = [
            "id", "vault", "vcenter", "source", "instance_uuid", "name", "power_state", "guest_os", "host",
            "datacenter", "cluster", "missing", "last_seen_at", "disks", "protected_item",
        ]
        read_only_fields = fields

    def get_protected_item(self, obj) -> str | None:
        items = obj.protected_items.all()
        return str(items[0].id) if items else None


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = Event
        fields = ["id", "vault", "severity", "kind", "message", "protected_item", "process_server", "job", "created_at"]
        read_only_fields = fields


class AlertSerializer(serializers.ModelSerializer):
    class Meta:
        model = Alert
        fields = [
            "id", "vault", "severity", "kind", "message", "state", "protected_item", "process_server", "job",
            "raised_at", "resolved_at", "acknowledged", "acknowledged_by", "acknowledged_at",
        ]
        read_only_fields = fields


class WorkloadSerializer(serializers.Serializer):
    rate_bytes_per_s = serializers.IntegerField(min_value=0, max_value=2 * 1024**3)
    write_size = serializers.IntegerField(min_value=512, max_value=8 * 1024 * 1024)
    pattern = serializers.ChoiceField(choices=list(PATTERNS))

    def validate_write_size(self, value):
        if value % 512:
            raise serializers.ValidationError("Writes are whole 512-byte sectors.")
        return value


class RecoveryNetworkSerializer(serializers.ModelSerializer):
    class Meta:
        model = RecoveryNetwork
        fields = ["id", "name", "purpose"]
        read_only_fields = ["id"]
        validators = []  # a duplicate name is a conflict (409), raised by the service


class RecoverySiteSerializer(serializers.ModelSerializer):
    """A recovery site with its networks (given on creation; changed later through
    ``recoverySites/{id}/networks``)."""

    password = serializers.CharField(
        write_only=True, required=False, allow_blank=True, max_length=512, style={"input_type": "password"},
        help_text="vSphere: stored encrypted; never returned.",
    )
    networks = RecoveryNetworkSerializer(
        many=True, required=False,
        help_text="On creation: at least one RECOVERY and one TEST network. Afterwards: read-only here.",
    )

    class Meta:
        model = RecoverySite
        fields = [
            "id", "vault", "name", "kind", "host", "port", "username", "password", "allow_untrusted", "thumbprint",
            "datacenter", "datastore", "placement", "networks", "created_at", "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
        validators = []  # a duplicate name is a conflict (409), raised by the service

    def get_fields(self):
        fields = super().get_fields()
        if self.instance is not None and not isinstance(self.instance, list):
            fields["vault"].read_only = True
            fields["networks"].read_only = True
        return fields

    def validate(self, attrs):
        if self.instance is None and not attrs.get("networks"):
            raise serializers.ValidationError(
                {"networks": "A recovery site needs its networks: at least one RECOVERY and one TEST network."}
            )
        return attrs

    def create(self, validated_data):
        return services.recovery_site_create(**validated_data)

    def update(self, instance, validated_data):
        validated_data.pop("vault", None)
        validated_data.pop("networks", None)
        return services.recovery_site_update(site=instance, **validated_data)


class RoleAssignmentSerializer(serializers.ModelSerializer):
    """A user's or a group's role on a vault: give ``user`` (a user name) or ``group`` (a
    group name)."""

    user = serializers.CharField(source="user.username", required=False, allow_null=True, max_length=150)
    group = serializers.CharField(source="group.name", required=False, allow_null=True, max_length=150)

    class Meta:
        model = RoleAssignment
        fields = ["id", "vault", "user", "group", "role", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
