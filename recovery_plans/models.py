from __future__ import annotations

from django.core.validators import MinValueValidator
from django.db import models

from core.models import TimeStampedModel
from replication.choices import RecoveryPointType


class ActionPhase(models.TextChoices):
    PRE = "PRE", "Before the group"
    POST = "POST", "After the group"


class ActionKind(models.TextChoices):
    SCRIPT = "SCRIPT", "Script"
    MANUAL = "MANUAL", "Manual action (pauses the plan)"


class RecoveryPlan(TimeStampedModel):
    """Ordered groups of protected items that fail over together."""

    vault = models.ForeignKey("vault.Vault", on_delete=models.CASCADE, related_name="recovery_plans")
    name = models.CharField(max_length=120)
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["vault", "name"], name="uniq_plan_name")]

    def __str__(self) -> str:
        return self.name


class RecoveryPlanGroup(models.Model):
    plan = models.ForeignKey(RecoveryPlan, on_delete=models.CASCADE, related_name="groups")
    order = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    name = models.CharField(max_length=120, blank=True)
    items = models.ManyToManyField("replication.ProtectedItem", related_name="recovery_plan_groups", blank=True)

    class Meta:
        ordering = ["plan", "order"]
        constraints = [models.UniqueConstraint(fields=["plan", "order"], name="uniq_group_order")]

    def __str__(self) -> str:
        return self.name or f"Group {self.order}"


class RecoveryPlanAction(models.Model):
    group = models.ForeignKey(RecoveryPlanGroup, on_delete=models.CASCADE, related_name="actions")
    phase = models.CharField(max_length=8, choices=ActionPhase.choices)
    order = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    kind = models.CharField(max_length=8, choices=ActionKind.choices)
    name = models.CharField(max_length=120)
    script = models.TextField(blank=True, help_text="For a script action: the command to run.")
    instructions = models.TextField(blank=True, help_text="For a manual action: what the admin must do.")

    class Meta:
        ordering = ["group", "phase", "order"]

    def __str__(self) -> str:
        return self.name


class RecoveredVmKind(models.TextChoices):
    TEST = "TEST", "Test failover VM"
    FAILOVER = "FAILOVER", "Failover VM"


class RecoveredVm(models.Model):
    """A VM brought up at a recovery site from one of an item's recovery points.

    The item's current test VM and current failover VM are its rows of each kind whose
    ``removed_at`` is empty; removed ones stay as the record of past drills.
    """

    item = models.ForeignKey("replication.ProtectedItem", on_delete=models.CASCADE, related_name="recovered_vms")
    kind = models.CharField(max_length=16, choices=RecoveredVmKind.choices, db_index=True)
    site = models.ForeignKey("vault.RecoverySite", on_delete=models.PROTECT, related_name="recovered_vms")
    network = models.ForeignKey("vault.RecoveryNetwork", on_delete=models.PROTECT, related_name="recovered_vms")
    vm_id = models.CharField(max_length=255, help_text="The VM's identifier at the recovery site.")
    name = models.CharField(max_length=255)
    power_state = models.CharField(max_length=20, blank=True)
    point_id = models.CharField(max_length=64, help_text="The data plane's identifier of the recovery point the disks came from.")
    point_time = models.DateTimeField(help_text="Source time of the newest write the recovery point contains.")
    point_type = models.CharField(max_length=20, choices=RecoveryPointType.choices)
    # One entry per disk: index, size_bytes, digest, method, location.
    disks = models.JSONField(default=list, blank=True)
    verified_bytes = models.BigIntegerField(default=0, help_text="Bytes of disk checked against the replica's digest.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    removed_at = models.DateTimeField(null=True, blank=True, db_index=True)
    cleanup_notes = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["item", "kind"], condition=models.Q(removed_at__isnull=True), name="uniq_current_recovered_vm"
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def disks_verified(self) -> int:
        return len(self.disks)
