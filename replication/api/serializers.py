from rest_framework import serializers

from replication.models import ProtectedItem, RecoveryPoint, ReplicaDisk
from vault.models import DiscoveredMachine, ProcessServer, RecoveryNetwork, RecoverySite, ReplicationPolicy, Vault


class ReplicaDiskSerializer(serializers.ModelSerializer):
    class Meta:
        model = ReplicaDisk
        fields = ["index", "source_disk_key", "label", "capacity_bytes", "removed_at"]  # removed: no longer replicated
        read_only_fields = fields


class _Stage(serializers.Serializer):
    """One stage of the data path (replication/data_path.py): bytes waiting, the rate they
    leave at over the last minutes (null until two reports were seen), as of when."""

    waiting_bytes = serializers.IntegerField(read_only=True)
    bytes_per_s = serializers.FloatField(read_only=True, allow_null=True)
    measured_at = serializers.DateTimeField(read_only=True, allow_null=True)


class AgentStageSerializer(_Stage):
    waiting_bytes = serializers.IntegerField(source="agent_backlog_bytes", read_only=True,
                                             help_text="Changed bytes not yet acknowledged by the process server.")
    bytes_per_s = serializers.FloatField(source="sent_bytes_per_s", read_only=True, allow_null=True,
                                         help_text="Batch bytes the process server received for the item, per second.")
    measured_at = serializers.DateTimeField(source="agent_last_heartbeat_at", read_only=True, allow_null=True)


class ProcessServerStageSerializer(_Stage):
    waiting_bytes = serializers.IntegerField(source="ps_pending_bytes", read_only=True,
                                             help_text="Sealed bytes cached at the process server, not yet uploaded.")
    bytes_per_s = serializers.FloatField(source="uploaded_bytes_per_s", read_only=True, allow_null=True,
                                         help_text="Sealed bytes uploaded to cache storage per second.")
    measured_at = serializers.DateTimeField(source="data_path_measured_at", read_only=True, allow_null=True)
    acked_seq = serializers.IntegerField(read_only=True)
    uploaded_seq = serializers.IntegerField(read_only=True)


class CacheStorageStageSerializer(_Stage):
    waiting_bytes = serializers.IntegerField(source="storage_waiting_bytes", read_only=True,
                                             help_text="Bytes of sealed logs in cache storage waiting to be applied.")
    bytes_per_s = serializers.FloatField(source="applied_bytes_per_s", read_only=True, allow_null=True,
                                         help_text="Sealed log bytes applied to the replica per second.")
    measured_at = serializers.DateTimeField(source="storage_measured_at", read_only=True, allow_null=True)
    applied_seq = serializers.IntegerField(read_only=True)


class DataPathSerializer(serializers.Serializer):
    agent = AgentStageSerializer(source="*", read_only=True)
    process_server = ProcessServerStageSerializer(source="*", read_only=True)
    cache_storage = CacheStorageStageSerializer(source="*", read_only=True)


class ProtectedItemSerializer(serializers.ModelSerializer):
    replica_disks = ReplicaDiskSerializer(many=True, read_only=True)
    data_path = DataPathSerializer(source="*", read_only=True, help_text=(
        "Bytes waiting at each stage of the data path and the rate they leave it at over the last minutes."))
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
            "resync_retry_at", "replication_group", "uploaded_seq", "data_path",
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
    process_server = serializers.PrimaryKeyRelatedField(
        queryset=ProcessServer.objects.all(), required=False, allow_null=True,
        help_text="Where the agent sends the machine's changes; default: the vault's least loaded process server.",
    )
    recovery_site = serializers.PrimaryKeyRelatedField(
        queryset=RecoverySite.objects.all(), required=False, allow_null=True,
        help_text="Where the item is recovered; its networks default to the site's first recovery and test networks.",
    )


class ChangeProcessServerSerializer(serializers.Serializer):
    """Switch process server: the one the item's agent sends to from now on."""

    process_server = serializers.PrimaryKeyRelatedField(queryset=ProcessServer.objects.all(),
                                                        help_text="A process server of the item's vault and site.")


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
