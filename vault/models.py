from __future__ import annotations

import uuid
import zoneinfo

from django.conf import settings
from django.contrib.auth.hashers import check_password
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from core.models import TimeStampedModel
from core.secrets import decrypt_secret
from core.validators import single_line
from vault.choices import (
    MAX_RETENTION_HOURS,
    AlertState,
    Health,
    MachineSource,
    Severity,
    Site,
    StorageTier,
    VCenterKind,
)
from vault.connectors.base import normalize_thumbprint
from vault.connectors.sites import open_recovery_site


def validate_time_zone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"'{value}' is not a known time zone (for example Europe/Paris or UTC).")


class Vault(TimeStampedModel):
    """The Recovery Services vault: owns everything else."""

    name = models.CharField(max_length=80, unique=True, validators=[single_line])
    description = models.TextField(blank=True)
    # Agents and servers prove they belong to the vault with this passphrase; stored hashed.
    passphrase_hash = models.CharField(max_length=256, editable=False)
    off_hours_start = models.TimeField(default="22:00", help_text="Automatic resynchronization may start from this time.")
    off_hours_end = models.TimeField(default="06:00", help_text="...and must not start after this time.")
    off_hours_time_zone = models.CharField(max_length=64, default="UTC", validators=[validate_time_zone])
    alert_emails = models.JSONField(default=list, blank=True, help_text="Who is e-mailed about alerts.")
    email_alerts_enabled = models.BooleanField(default=True)
    # Per-vault key material, encrypted at rest: the AES-256 key that seals replication data
    # and the HMAC key that signs agent and process-server tokens.
    seal_key_encrypted = models.TextField(editable=False)
    auth_key_encrypted = models.TextField(editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def check_passphrase(self, passphrase: str) -> bool:
        return bool(passphrase) and check_password(passphrase, self.passphrase_hash)


class ConfigurationServer(TimeStampedModel):
    """The on-premises coordinator; the Lifeboat web/API service plays it."""

    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="configuration_servers")
    name = models.CharField(max_length=120, validators=[single_line])
    host = models.CharField(max_length=255)
    version = models.CharField(max_length=40, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["vault", "name"], name="uniq_config_server_name")]

    def __str__(self) -> str:
        return self.name


class ProcessServer(TimeStampedModel):
    """Receives replication data from agents, caches it durably and uploads it sealed."""

    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="process_servers")
    name = models.CharField(max_length=120, validators=[single_line])
    host = models.CharField(max_length=255)
    data_port = models.PositiveIntegerField(default=9443, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    site = models.CharField(max_length=16, choices=Site.choices, default=Site.PRIMARY)
    thumbprint = models.CharField(max_length=128, blank=True, help_text="SHA-256 of its TLS certificate.")
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    cpu_percent = models.FloatField(null=True, blank=True)
    memory_percent = models.FloatField(null=True, blank=True)
    cache_free_bytes = models.BigIntegerField(null=True, blank=True)
    cache_total_bytes = models.BigIntegerField(null=True, blank=True)
    pending_upload_bytes = models.BigIntegerField(null=True, blank=True)
    health = models.CharField(max_length=16, choices=Health.choices, default=Health.HEALTHY, editable=False, db_index=True)
    health_reasons = models.JSONField(default=list, blank=True, editable=False)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["vault", "name"], name="uniq_process_server_name")]

    def __str__(self) -> str:
        return self.name

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.data_port}"


class MasterTargetServer(TimeStampedModel):
    """Writes replication data back to on-premises disks during failback."""

    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="master_target_servers")
    name = models.CharField(max_length=120, validators=[single_line])
    host = models.CharField(max_length=255)
    site = models.CharField(max_length=16, choices=Site.choices, default=Site.PRIMARY)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["vault", "name"], name="uniq_master_target_name")]

    def __str__(self) -> str:
        return self.name


class VCenter(TimeStampedModel):
    """A VMware endpoint (vCenter or ESXi, or the simulated site) added to the vault."""

    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="vcenters")
    name = models.CharField(max_length=120, validators=[single_line])
    kind = models.CharField(max_length=16, choices=VCenterKind.choices, default=VCenterKind.VCENTER)
    host = models.CharField(max_length=255, help_text="Host name or address; for the simulated site, its data directory.")
    port = models.PositiveIntegerField(default=443, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    username = models.CharField(max_length=255)
    password_encrypted = models.TextField(editable=False)
    allow_untrusted = models.BooleanField(default=False, help_text="Accept a certificate no trusted authority signed.")
    thumbprint = models.CharField(max_length=128, blank=True, help_text="Pin this certificate thumbprint (SHA-1 or SHA-256).")
    discovery_interval_minutes = models.PositiveIntegerField(default=15, validators=[MinValueValidator(5), MaxValueValidator(1440)])
    last_discovery_at = models.DateTimeField(null=True, blank=True)
    last_discovery_error = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "vCenter server"
        constraints = [models.UniqueConstraint(fields=["vault", "name"], name="uniq_vcenter_name")]

    def __str__(self) -> str:
        return self.name


class DiscoveredMachine(TimeStampedModel):
    """A VM found by discovery, or a machine registered by its mobility agent."""

    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="machines")
    vcenter = models.ForeignKey(VCenter, on_delete=models.CASCADE, related_name="machines", null=True, blank=True)
    source = models.CharField(max_length=16, choices=MachineSource.choices, default=MachineSource.VCENTER)
    instance_uuid = models.CharField(max_length=64)
    name = models.CharField(max_length=255, db_index=True)
    power_state = models.CharField(max_length=20, blank=True)
    guest_os = models.CharField(max_length=120, blank=True)
    host = models.CharField(max_length=255, blank=True)
    datacenter = models.CharField(max_length=255, blank=True)
    cluster = models.CharField(max_length=255, blank=True)
    missing = models.BooleanField(default=False, db_index=True, help_text="No longer seen by discovery.")
    last_seen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["vault", "instance_uuid"], name="uniq_machine_uuid")]

    def __str__(self) -> str:
        return self.name


class DiscoveredDisk(models.Model):
    machine = models.ForeignKey(DiscoveredMachine, on_delete=models.CASCADE, related_name="disks")
    key = models.IntegerField()
    label = models.CharField(max_length=120, blank=True)
    capacity_bytes = models.BigIntegerField(validators=[MinValueValidator(0)])
    backing_file = models.CharField(max_length=500, blank=True)
    datastore = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["machine", "key"]
        constraints = [models.UniqueConstraint(fields=["machine", "key"], name="uniq_disk_key")]

    def __str__(self) -> str:
        return f"{self.machine} / {self.label or self.key}"


class ReplicationPolicy(TimeStampedModel):
    """RPO threshold, retention and snapshot cadence; a failback policy comes with each."""

    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="policies")
    name = models.CharField(max_length=80, validators=[single_line])
    storage_tier = models.CharField(max_length=16, choices=StorageTier.choices, default=StorageTier.STANDARD)
    rpo_threshold_minutes = models.PositiveIntegerField(
        default=15, validators=[MinValueValidator(1), MaxValueValidator(1440)],
        help_text="Above this RPO an alert is raised (replication is not throttled).",
    )
    recovery_point_retention_hours = models.PositiveIntegerField(
        default=24, validators=[MinValueValidator(0), MaxValueValidator(72)],
        help_text="How long recovery points are kept: at most 24 h on premium, 72 h on standard storage.",
    )
    app_consistent_frequency_hours = models.PositiveIntegerField(
        default=4, validators=[MinValueValidator(0), MaxValueValidator(12)],
        help_text="0 turns app-consistent snapshots off; otherwise every 1 to 12 hours.",
    )
    crash_consistent_frequency_seconds = models.PositiveIntegerField(
        default=300, validators=[MinValueValidator(5), MaxValueValidator(3600)],
        help_text="How often a crash-consistent recovery point is cut.",
    )
    is_failback = models.BooleanField(default=False, editable=False)
    failback_policy = models.OneToOneField(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="primary_policy", editable=False
    )

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "replication policies"
        constraints = [models.UniqueConstraint(fields=["vault", "name"], name="uniq_policy_name")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        limit = MAX_RETENTION_HOURS[StorageTier(self.storage_tier)]
        if self.recovery_point_retention_hours is not None and self.recovery_point_retention_hours > limit:
            raise ValidationError(
                {"recovery_point_retention_hours": f"{self.get_storage_tier_display()} storage keeps recovery points for at most {limit} hours."}
            )


class Event(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="events")
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.INFO, db_index=True)
    kind = models.CharField(max_length=60, db_index=True)
    message = models.TextField()
    protected_item = models.ForeignKey(
        "replication.ProtectedItem", on_delete=models.CASCADE, null=True, blank=True, related_name="events"
    )
    process_server = models.ForeignKey(ProcessServer, on_delete=models.CASCADE, null=True, blank=True, related_name="events")
    job = models.ForeignKey("core.Job", on_delete=models.SET_NULL, null=True, blank=True, related_name="events")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.message


class Alert(models.Model):
    """A problem that is (or was) going on; raised once when it starts, resolved when it ends."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="alerts")
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.WARNING, db_index=True)
    kind = models.CharField(max_length=60, db_index=True)
    # One active alert per (vault, key): "rpo:<item id>", "ps_heartbeat:<server id>", ...
    key = models.CharField(max_length=200)
    message = models.TextField()
    state = models.CharField(max_length=16, choices=AlertState.choices, default=AlertState.ACTIVE, db_index=True, editable=False)
    protected_item = models.ForeignKey(
        "replication.ProtectedItem", on_delete=models.SET_NULL, null=True, blank=True, related_name="alerts"
    )
    process_server = models.ForeignKey(ProcessServer, on_delete=models.SET_NULL, null=True, blank=True, related_name="alerts")
    job = models.ForeignKey("core.Job", on_delete=models.SET_NULL, null=True, blank=True, related_name="alerts")
    raised_at = models.DateTimeField(auto_now_add=True, db_index=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    acknowledged = models.BooleanField(default=False, db_index=True)
    acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    emailed_start_at = models.DateTimeField(null=True, blank=True, editable=False)
    emailed_end_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-raised_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["vault", "key"], condition=models.Q(state="ACTIVE"), name="uniq_active_alert_key"
            )
        ]

    def __str__(self) -> str:
        return self.message


class RecoverySiteKind(models.TextChoices):
    SIMULATED = "simulated", "Simulated recovery site"
    VSPHERE = "vsphere", "vSphere (vCenter / ESXi)"


class NetworkPurpose(models.TextChoices):
    RECOVERY = "RECOVERY", "Recovery network"
    TEST = "TEST", "Isolated test network"


class RecoverySite(TimeStampedModel):
    """Where failed-over VMs run: the simulated recovery site or a vSphere endpoint."""

    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="recovery_sites")
    name = models.CharField(max_length=120, validators=[single_line])
    kind = models.CharField(max_length=16, choices=RecoverySiteKind.choices, default=RecoverySiteKind.SIMULATED)
    host = models.CharField(
        max_length=1000, help_text="Host name or address of the vCenter / ESXi server; for the simulated site, its data directory."
    )
    port = models.PositiveIntegerField(default=443, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    username = models.CharField(max_length=255, blank=True)
    password_encrypted = models.TextField(blank=True, editable=False)
    allow_untrusted = models.BooleanField(default=False, help_text="Accept a certificate no trusted authority signed.")
    thumbprint = models.CharField(max_length=128, blank=True, help_text="Pin this certificate thumbprint (SHA-1 or SHA-256).")
    datacenter = models.CharField(max_length=255, blank=True, help_text="vSphere: the datacenter recovered VMs are created in.")
    datastore = models.CharField(max_length=255, blank=True, help_text="vSphere: the datastore recovered disks are uploaded to.")
    placement = models.CharField(max_length=255, blank=True, help_text="vSphere: the host or cluster recovered VMs run on.")

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["vault", "name"], name="uniq_recovery_site_name")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors = {}
        if self.kind == RecoverySiteKind.SIMULATED:
            if self.host and not self.host.startswith("/"):
                errors["host"] = "The simulated recovery site's data directory must be an absolute path."
        elif self.kind == RecoverySiteKind.VSPHERE:
            for field, what in (("username", "a user name"), ("datacenter", "the datacenter"),
                                ("datastore", "the datastore"), ("placement", "the host or cluster recovered VMs run on")):
                if not getattr(self, field):
                    errors[field] = f"A vSphere recovery site needs {what}."
            if self.thumbprint:
                try:
                    normalize_thumbprint(self.thumbprint)
                except ValueError as exc:
                    errors["thumbprint"] = str(exc)
        if errors:
            raise ValidationError(errors)

    def connector(self, *, workload: dict | None = None):
        """An unopened RecoverySiteConnector for this site (use it as a context manager).

        ``workload`` (simulated site only): how the VMs it creates write to their disks once
        running, as the simulated source VMs do (``vault.simulation.machine_workload``).
        """
        if self.kind == RecoverySiteKind.SIMULATED:
            return open_recovery_site(
                "simulated", data_dir=self.host, networks=[n.name for n in self.networks.all()], workload=workload
            )
        return open_recovery_site(
            "vsphere", host=self.host, port=self.port, username=self.username,
            password=decrypt_secret(self.password_encrypted).decode(), allow_untrusted=self.allow_untrusted,
            thumbprint=self.thumbprint or None, datacenter=self.datacenter, datastore=self.datastore,
            placement=self.placement,
        )


class RecoveryNetwork(models.Model):
    """A network of a recovery site that recovered VMs are attached to (a port group on vSphere)."""

    site = models.ForeignKey(RecoverySite, on_delete=models.CASCADE, related_name="networks")
    name = models.CharField(max_length=255, validators=[single_line])
    purpose = models.CharField(max_length=16, choices=NetworkPurpose.choices, default=NetworkPurpose.RECOVERY)

    class Meta:
        ordering = ["site", "purpose", "name"]
        constraints = [models.UniqueConstraint(fields=["site", "name"], name="uniq_recovery_network_name")]

    def __str__(self) -> str:
        return f"{self.site} / {self.name}"


class VaultRole(models.TextChoices):
    """ASR's built-in roles, per vault (what each may do: ``vault.roles``)."""

    OWNER = "OWNER", "Owner"
    CONTRIBUTOR = "CONTRIBUTOR", "Contributor"
    OPERATOR = "OPERATOR", "Operator"
    READER = "READER", "Reader"


class RoleAssignment(TimeStampedModel):
    """A user's or a group's role on one vault."""

    vault = models.ForeignKey(Vault, on_delete=models.CASCADE, related_name="role_assignments")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True,
                             related_name="vault_roles")
    group = models.ForeignKey("auth.Group", on_delete=models.CASCADE, null=True, blank=True, related_name="vault_roles")
    role = models.CharField(max_length=16, choices=VaultRole.choices)

    class Meta:
        ordering = ["vault", "role", "id"]
        constraints = [
            models.CheckConstraint(
                condition=(models.Q(user__isnull=False, group__isnull=True) | models.Q(user__isnull=True, group__isnull=False)),
                name="role_for_user_or_group"),
            models.UniqueConstraint(fields=["vault", "user"], name="uniq_vault_user_role"),
            models.UniqueConstraint(fields=["vault", "group"], name="uniq_vault_group_role"),
        ]

    def __str__(self) -> str:
        who = self.user.get_username() if self.user_id else f"group {self.group.name}"
        return f"{who}: {self.get_role_display()} of {self.vault}"
