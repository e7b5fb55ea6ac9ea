from __future__ import annotations

import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from core.models import TimeStampedModel
from replication.choices import (
    Direction,
    GroupPointState,
    ProtectionState,
    RecoveryPointType,
    RegistrationState,
    TestFailoverState,
)
from vault.choices import Health
from vault.models import NetworkPurpose


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


class ReplicationGroup(TimeStampedModel):
    """Protected items that get shared recovery points (multi-VM consistency): one cut of
    all their write streams, taken under a barrier, so that failing them over together never
    shows one VM referring to data another does not have."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vault = models.ForeignKey("vault.Vault", on_delete=models.CASCADE, related_name="replication_groups")
    name = models.CharField(max_length=120)
    point_frequency_seconds = models.PositiveIntegerField(
        default=300, help_text="How often a shared (group) recovery point is taken; 0: only when asked for."
    )
    last_point_requested_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["vault", "name"], name="uniq_replication_group_name")]

    def __str__(self) -> str:
        return self.name


class GroupRecoveryPoint(models.Model):
    """A replication group's shared point: one recovery point per member, all cut at the
    journal positions noted while every member's writes were held. Complete only when every
    member has its point; an abandoned round (a member not held in time) never is."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    group = models.ForeignKey(ReplicationGroup, on_delete=models.CASCADE, related_name="points")
    state = models.CharField(max_length=16, choices=GroupPointState.choices, default=GroupPointState.HOLDING, editable=False)
    members = models.JSONField(default=list, editable=False, help_text="The protected items (ids) the point was taken of.")
    reason = models.TextField(blank=True, editable=False)  # why the round was abandoned
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.group} @ {self.created_at:%Y-%m-%d %H:%M:%S} ({self.state})"


class ProtectedItem(TimeStampedModel):
    """One replicated VM: its disks, policy, process server, state, health and RPO."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vault = models.ForeignKey("vault.Vault", on_delete=models.CASCADE, related_name="protected_items")
    machine = models.ForeignKey("vault.DiscoveredMachine", on_delete=models.PROTECT, related_name="protected_items")
    policy = models.ForeignKey("vault.ReplicationPolicy", on_delete=models.PROTECT, related_name="protected_items")
    process_server = models.ForeignKey("vault.ProcessServer", on_delete=models.PROTECT, related_name="protected_items")
    name = models.CharField(max_length=255, db_index=True)
    protection_state = models.CharField(
        max_length=32, choices=ProtectionState.choices, default=ProtectionState.ENABLING, editable=False, db_index=True
    )
    test_failover_state = models.CharField(
        max_length=16, choices=TestFailoverState.choices, default=TestFailoverState.NONE, editable=False, db_index=True
    )
    direction = models.CharField(
        max_length=24, choices=Direction.choices, default=Direction.PRIMARY_TO_RECOVERY, editable=False
    )
    health = models.CharField(max_length=16, choices=Health.choices, default=Health.HEALTHY, editable=False, db_index=True)
    health_reasons = models.JSONField(default=list, blank=True, editable=False)
    # Not indexed: the monitoring sweep rewrites every item's RPO every 30 s, and a write to an
    # indexed column cannot be a heap-only (HOT) update, so each one would also write every
    # index of the table. Sorting by RPO reads one vault's items at most (a top-N sort).
    rpo_seconds = models.PositiveIntegerField(null=True, blank=True, editable=False)
    last_recovery_point_at = models.DateTimeField(null=True, blank=True, editable=False)
    initial_replication_progress = models.PositiveSmallIntegerField(default=0, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    # Data path figures, reported by the agent and the process server.
    agent_last_heartbeat_at = models.DateTimeField(null=True, blank=True, editable=False)
    agent_backlog_bytes = models.BigIntegerField(default=0, editable=False)
    acked_seq = models.BigIntegerField(default=0, editable=False)
    applied_seq = models.BigIntegerField(default=0, editable=False)
    # The data path in bytes (replication/data_path.py). From the process server's heartbeat:
    # the sealed bytes it holds for the item not yet uploaded, how far it uploaded, and the
    # rates over the last minutes (bytes/s received from the agent, uploaded, applied).
    uploaded_seq = models.BigIntegerField(default=0, editable=False)
    ps_pending_bytes = models.BigIntegerField(default=0, editable=False)
    sent_bytes_per_s = models.FloatField(null=True, blank=True, editable=False)
    uploaded_bytes_per_s = models.FloatField(null=True, blank=True, editable=False)
    applied_bytes_per_s = models.FloatField(null=True, blank=True, editable=False)
    data_path_measured_at = models.DateTimeField(null=True, blank=True, editable=False)
    # From the apply passes: sealed log bytes applied, ever (a counter), and the bytes of logs
    # left in cache storage after the last pass.
    applied_log_bytes = models.BigIntegerField(default=0, editable=False)
    storage_waiting_bytes = models.BigIntegerField(default=0, editable=False)
    storage_measured_at = models.DateTimeField(null=True, blank=True, editable=False)
    # When the item's last apply pass ended (the apply sweep leaves items just applied alone).
    last_applied_at = models.DateTimeField(null=True, blank=True, editable=False)
    state_changed_at = models.DateTimeField(auto_now_add=True, editable=False)
    # One apply pass at a time per item: a worker holds this lease while it applies.
    apply_lease_until = models.DateTimeField(null=True, blank=True, editable=False)
    apply_lease_owner = models.CharField(max_length=32, blank=True, editable=False)  # see replication/lease.py
    # App-consistent bookmarks asked of the agent and not yet seen as recovery points:
    # [{"id", "label", "positions": {disk index: journal seq}, "requested_at"}].
    pending_bookmarks = models.JSONField(default=list, blank=True, editable=False)
    last_app_consistent_request_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Resyncs that failed in a row, and when the off-hours sweep may try again (backoff).
    resync_attempts = models.PositiveIntegerField(default=0, editable=False)
    resync_retry_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Where the item is recovered: the recovery site, and the networks a failed-over VM and a
    # test VM are attached to (network mapping; by default the site's first of each purpose).
    recovery_site = models.ForeignKey(
        "vault.RecoverySite", on_delete=models.PROTECT, null=True, blank=True, related_name="protected_items"
    )
    recovery_network = models.ForeignKey(
        "vault.RecoveryNetwork", on_delete=models.PROTECT, null=True, blank=True, related_name="items_recovering",
        help_text="The network a failed-over VM is attached to.",
    )
    test_network = models.ForeignKey(
        "vault.RecoveryNetwork", on_delete=models.PROTECT, null=True, blank=True, related_name="items_testing",
        help_text="The isolated network a test-failover VM is attached to.",
    )
    replication_group = models.ForeignKey(
        ReplicationGroup, on_delete=models.SET_NULL, null=True, blank=True, related_name="members", editable=False,
        help_text="The replication group whose shared recovery points the item gets.",
    )
    # The generation of the item's token (``replication.dataplane.auth``): bumping it revokes
    # every older item token at the process servers (rotateToken, an approved registration).
    token_generation = models.PositiveBigIntegerField(default=0, editable=False)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["machine"], name="uniq_protected_machine")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors = {}
        site = self.recovery_site
        if site is not None and site.vault_id != self.vault_id:
            errors["recovery_site"] = "The recovery site belongs to another vault."
        for field, purpose in (("recovery_network", NetworkPurpose.RECOVERY), ("test_network", NetworkPurpose.TEST)):
            network = getattr(self, field)
            if network is None:
                continue
            if site is None or network.site_id != site.pk:
                errors[field] = f"The network '{network.name}' is not a network of the item's recovery site."
            elif network.purpose != purpose:
                have, want = network.get_purpose_display().lower(), NetworkPurpose(purpose).label.lower()
                errors[field] = f"The network '{network.name}' is {_a(have)}, not {_a(want)}."
        if errors:
            raise ValidationError(errors)


class ReplicaDisk(models.Model):
    """The recovery-site copy of one source disk, that replication logs are applied to."""

    item = models.ForeignKey(ProtectedItem, on_delete=models.CASCADE, related_name="replica_disks")
    index = models.PositiveSmallIntegerField(help_text="The disk's number in the item's replication stream.")
    source_disk_key = models.IntegerField()
    label = models.CharField(max_length=120, blank=True)
    capacity_bytes = models.BigIntegerField()
    storage_name = models.CharField(max_length=255, help_text="Name of the replica disk in target storage.")
    # Where the mobility agent reads the source disk, and its write-filter journal if any.
    source_path = models.CharField(max_length=1000, blank=True)
    journal_dir = models.CharField(max_length=1000, blank=True)
    # Set when the disk left the machine: it is replicated no more, its replica stays for
    # the recovery points that have it.
    removed_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["item", "index"]
        constraints = [models.UniqueConstraint(fields=["item", "index"], name="uniq_replica_disk_index")]

    def __str__(self) -> str:
        return f"{self.item} / {self.label or self.source_disk_key}"


class RecoveryPoint(models.Model):
    """A point in time the item can be recovered to; mirrors the data plane's own record."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    item = models.ForeignKey(ProtectedItem, on_delete=models.CASCADE, related_name="recovery_points")
    point_id = models.CharField(max_length=64, help_text="The data plane's identifier of the point.")
    seq = models.BigIntegerField()
    time = models.DateTimeField(db_index=True, help_text="Source time of the newest write the point contains.")
    type = models.CharField(max_length=20, choices=RecoveryPointType.choices, db_index=True)
    label = models.CharField(max_length=255, blank=True)
    group_point = models.ForeignKey(
        GroupRecoveryPoint, on_delete=models.SET_NULL, null=True, blank=True, related_name="item_points",
        help_text="The replication group's shared point this point is the item's share of.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-time"]
        indexes = [models.Index(fields=["item", "-time"])]
        constraints = [models.UniqueConstraint(fields=["item", "point_id"], name="uniq_item_point")]

    def __str__(self) -> str:
        return f"{self.item} @ {self.time:%Y-%m-%d %H:%M:%S} ({self.get_type_display()})"


class MobilityAgent(TimeStampedModel):
    """A mobility agent registered with the configuration server, beside one machine's disks."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vault = models.ForeignKey("vault.Vault", on_delete=models.CASCADE, related_name="agents")
    machine = models.OneToOneField("vault.DiscoveredMachine", on_delete=models.CASCADE, related_name="agent")
    hostname = models.CharField(max_length=255)
    version = models.CharField(max_length=40, blank=True)
    # Installed by Lifeboat (the simulated site's push install) or by an admin by hand.
    pushed = models.BooleanField(default=False, editable=False)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_status = models.JSONField(default=dict, blank=True, editable=False)
    # The disks the agent reported at registration: key, path, capacity.
    disks = models.JSONField(default=list, blank=True, editable=False)
    # The generation of the agent's token: only a token of this generation is accepted
    # (bumped by revoke, rotate and an approved registration).
    token_generation = models.PositiveBigIntegerField(default=0, editable=False)
    # A rotation under way: the previous generation still fetches the assignment (which
    # hands the agent its new token) until the agent first calls with the new one.
    rotating = models.BooleanField(default=False, editable=False)

    def __str__(self) -> str:
        return f"agent on {self.hostname}"


class AgentRegistration(TimeStampedModel):
    """A registration for a machine that already has an agent, made without that agent's
    token: it gets no credentials until an administrator approves it (issue 16 part 3).
    The registering agent polls for the outcome with a secret of its own (only its SHA-256
    is kept)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vault = models.ForeignKey("vault.Vault", on_delete=models.CASCADE, related_name="agent_registrations")
    machine = models.ForeignKey("vault.DiscoveredMachine", on_delete=models.CASCADE, related_name="agent_registrations")
    hostname = models.CharField(max_length=255)
    version = models.CharField(max_length=40, blank=True)
    # The machine as the registration described it (name, os, instance_uuid, disks).
    report = models.JSONField(default=dict, blank=True, editable=False)
    remote_addr = models.GenericIPAddressField(null=True, blank=True, editable=False)
    state = models.CharField(max_length=16, choices=RegistrationState.choices, default=RegistrationState.PENDING,
                             editable=False, db_index=True)
    poll_digest = models.CharField(max_length=64, unique=True, editable=False)
    decided_at = models.DateTimeField(null=True, blank=True, editable=False)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+", editable=False)
    # The agent token generation its approval issued: the poll hands out that token only
    # while it is still the agent's current one.
    agent_generation = models.PositiveBigIntegerField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"registration of {self.hostname} for {self.machine}"


class DataPathSample(models.Model):
    """A process server's counters as one heartbeat reported them, kept for a few minutes so
    that rates come from successive samples (replication/data_path.py). A row with an item
    holds that item's figures; a row without, the server's totals."""

    server = models.ForeignKey("vault.ProcessServer", on_delete=models.CASCADE, related_name="data_path_samples")
    item = models.ForeignKey(ProtectedItem, on_delete=models.CASCADE, null=True, blank=True,
                             related_name="data_path_samples")
    at = models.DateTimeField()
    # When the process server started: its counters count from there, so a new value here
    # means they began again from 0.
    started_at = models.FloatField()
    received_bytes = models.BigIntegerField()  # batch bytes received and acknowledged since the start
    uploaded_bytes = models.BigIntegerField()  # sealed bytes put into cache storage since the start
    applied_log_bytes = models.BigIntegerField(null=True, blank=True)  # the item's counter then

    class Meta:
        ordering = ["at"]
        indexes = [models.Index(fields=["server", "at"])]

    def __str__(self) -> str:
        return f"{self.item or self.server} @ {self.at:%H:%M:%S}"
