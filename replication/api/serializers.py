from rest_framework import serializers

from replication.models import ProtectedItem, RecoveryPoint, ReplicaDisk
from vault.models import DiscoveredMachine, ProcessServer, RecoveryNetwork, RecoverySite, ReplicationPolicy, Vault


class ReplicaDiskSerializer(serializers.ModelSerializer):
    class Meta:
        model = ReplicaDisk
        fields = ["index", "source_disk_key", "label", "capacity_bytes", "removed_at"]  # removed: no longer replicated
        read_only_fields = fields


class ProtectedItemSerializer(serializers.ModelSerializer):
    replica_disks = ReplicaDiskSerializer(many=True, read_only=True)
    machine_name = serializers.CharField(source="machine.name", read_only=True)
    policy_name = serializers.CharField(source="policy.name", read_only=True)
    process_server_name = serializers.CharField(source="process_server.name", read_only=True)
    recovery_site_name = serializers.CharField(source="recovery_site.name", read_only=True, default=None, allow_null=True)
    recovery_network_name = serializers.CharField(source="recovery_network.name", read_only=True, default=None, allow_null=True)
    test_network_name = serializers.CharField(source="test_network.name", read_only=True, default=None, allow_null=True)

    class Meta:
        model = ProtectedItem
        fields = [
            "id", "vault", "name", "machine", "machine_name", "policy", "policy_name", "process_server",
            "process_server_name", "protection_state", "test_failover_state", "direction", "health",
            "health_reasons", "rpo_seconds", "last_recovery_point_at", "initial_replication_progress",
            "last_error", "agent_last_heartbeat_at", "agent_backlog_bytes", "acked_seq", "applied_seq",
            "replica_disks", "recovery_site", "recovery_site_name", "recovery_network", "recovery_network_name",
            "test_network", "test_network_name", "state_changed_at", "created_at", "resync_attempts",
            "resync_retry_at", "replication_group",
        ]
        read_only_fields = fields


class RecoveryPointSerializer(serializers.ModelSerializer):
    class Meta:
        model = RecoveryPoint
        fields = ["id", "item", "point_id", "seq", "time", "type", "label", "group_point", "created_at"]
        read_only_fields = fields


class EnableReplicationSerializer(serializers.Serializer):
    """What enabling replication of one machine needs (all in the same vault)."""

    vault = serializers.PrimaryKeyRelatedField(queryset=Vault.objects.all())
    machine = serializers.PrimaryKeyRelatedField(queryset=DiscoveredMachine.objects.all())
    policy = serializers.PrimaryKeyRelatedField(queryset=ReplicationPolicy.objects.filter(is_failback=False))
    process_server = serializers.PrimaryKeyRelatedField(queryset=ProcessServer.objects.all())
    recovery_site = serializers.PrimaryKeyRelatedField(
        queryset=RecoverySite.objects.all(), required=False, allow_null=True,
        help_text="Where the item is recovered; its networks default to the site's first recovery and test networks.",
    )


class RecoverySettingsSerializer(serializers.Serializer):
    """Where an item is recovered: its recovery site and network mapping."""

    recovery_site = serializers.PrimaryKeyRelatedField(queryset=RecoverySite.objects.all(), allow_null=True)
    recovery_network = serializers.PrimaryKeyRelatedField(
        queryset=RecoveryNetwork.objects.all(), required=False, allow_null=True,
        help_text="The network a failed-over VM goes on (a RECOVERY network of the site); default: the site's first.",
    )
    test_network = serializers.PrimaryKeyRelatedField(
        queryset=RecoveryNetwork.objects.all(), required=False, allow_null=True,
        help_text="The isolated network a test VM goes on (a TEST network of the site); default: the site's first.",
    )
