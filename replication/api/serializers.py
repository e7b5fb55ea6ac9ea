from rest_framework import serializers

from replication.models import ProtectedItem, RecoveryPoint, ReplicaDisk
from vault.models import DiscoveredMachine, ProcessServer, ReplicationPolicy, Vault


class ReplicaDiskSerializer(serializers.ModelSerializer):
    class Meta:
        model = ReplicaDisk
        fields = ["index", "source_disk_key", "label", "capacity_bytes"]
        read_only_fields = fields


class ProtectedItemSerializer(serializers.ModelSerializer):
    replica_disks = ReplicaDiskSerializer(many=True, read_only=True)
    machine_name = serializers.CharField(source="machine.name", read_only=True)
    policy_name = serializers.CharField(source="policy.name", read_only=True)
    process_server_name = serializers.CharField(source="process_server.name", read_only=True)

    class Meta:
        model = ProtectedItem
        fields = [
            "id", "vault", "name", "machine", "machine_name", "policy", "policy_name", "process_server",
            "process_server_name", "protection_state", "test_failover_state", "direction", "health",
            "health_reasons", "rpo_seconds", "last_recovery_point_at", "initial_replication_progress",
            "last_error", "agent_last_heartbeat_at", "agent_backlog_bytes", "acked_seq", "applied_seq",
            "replica_disks", "state_changed_at", "created_at",
        ]
        read_only_fields = fields


class RecoveryPointSerializer(serializers.ModelSerializer):
    class Meta:
        model = RecoveryPoint
        fields = ["id", "item", "point_id", "seq", "time", "type", "label", "created_at"]
        read_only_fields = fields


class EnableReplicationSerializer(serializers.Serializer):
    """What enabling replication of one machine needs (all in the same vault)."""

    vault = serializers.PrimaryKeyRelatedField(queryset=Vault.objects.all())
    machine = serializers.PrimaryKeyRelatedField(queryset=DiscoveredMachine.objects.all())
    policy = serializers.PrimaryKeyRelatedField(queryset=ReplicationPolicy.objects.filter(is_failback=False))
    process_server = serializers.PrimaryKeyRelatedField(queryset=ProcessServer.objects.all())
