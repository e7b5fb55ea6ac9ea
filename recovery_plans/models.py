from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from core.models import TimeStampedModel
from replication.choices import RecoveryPointType
from vault.models import NetworkPurpose


class ActionPhase(models.TextChoices):
    PRE = "PRE", "Before the group"
    POST = "POST", "After the group"


class ActionKind(models.TextChoices):
    SCRIPT = "SCRIPT", "Script"
    MANUAL = "MANUAL", "Manual action (pauses the plan)"


class PlanRecoveryPoint(models.TextChoices):
    """How a plan picks each item's recovery point (the single-item recovery's names)."""

    LATEST = "latest", "Latest: the newest recovery point"
    LATEST_PROCESSED = "latest_processed", "Latest processed (every point is processed when it is cut)"
    LATEST_APP_CONSISTENT = "latest_app_consistent", "Latest app-consistent: the newest quiesced point"


# A script action's timeout: long enough for a DNS update or a database check, short enough
# that a hung script cannot hold a plan for a day.
SCRIPT_TIMEOUT_MIN_SECONDS = 1
SCRIPT_TIMEOUT_MAX_SECONDS = 7200
SCRIPT_TIMEOUT_DEFAULT_SECONDS = 600


class RecoveryPlan(TimeStampedModel):
    """Ordered groups of protected items that fail over together."""

    vault = models.ForeignKey("vault.Vault", on_delete=models.CASCADE, related_name="recovery_plans")
    name = models.CharField(max_length=120)
    description = models.TextField(blank=True)
    recovery_point_type = models.CharField(
        max_length=24, choices=PlanRecoveryPoint.choices, default=PlanRecoveryPoint.LATEST,
        help_text="The recovery point each item fails over to, unless a run chooses another.",
    )

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
    timeout_seconds = models.PositiveIntegerField(
        default=SCRIPT_TIMEOUT_DEFAULT_SECONDS,
        validators=[
            MinValueValidator(SCRIPT_TIMEOUT_MIN_SECONDS, message="A script's timeout is at least %(limit_value)s second."),
            MaxValueValidator(SCRIPT_TIMEOUT_MAX_SECONDS,
                              message="A script's timeout is at most %(limit_value)s seconds (two hours)."),
        ],
        help_text=f"For a script action: seconds it may run ({SCRIPT_TIMEOUT_MIN_SECONDS}-{SCRIPT_TIMEOUT_MAX_SECONDS}) "
                  "before it is stopped and the plan fails there.",
    )
    instructions = models.TextField(blank=True, help_text="For a manual action: what the admin must do.")

    class Meta:
        ordering = ["group", "phase", "order"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.kind == ActionKind.SCRIPT and not (self.script or "").strip():
            raise ValidationError({"script": "A script action needs the command to run."})
        if self.kind == ActionKind.MANUAL and not (self.instructions or "").strip():
            raise ValidationError({"instructions": "A manual action needs instructions for the admin."})


class RecoveryPlanNetworkMapping(models.Model):
    """A plan's network mapping for one recovery site: where its items' VMs go there.

    Empty networks fall back to each item's own mapping, then to the site's first network of
    the purpose (as for the recovery of one item).
    """

    plan = models.ForeignKey(RecoveryPlan, on_delete=models.CASCADE, related_name="network_mappings")
    site = models.ForeignKey("vault.RecoverySite", on_delete=models.CASCADE, related_name="plan_network_mappings")
    recovery_network = models.ForeignKey(
        "vault.RecoveryNetwork", on_delete=models.PROTECT, null=True, blank=True, related_name="plans_recovering",
        help_text="The network failed-over VMs are attached to.",
    )
    test_network = models.ForeignKey(
        "vault.RecoveryNetwork", on_delete=models.PROTECT, null=True, blank=True, related_name="plans_testing",
        help_text="The isolated network test-failover VMs are attached to.",
    )

    class Meta:
        ordering = ["plan", "site__name"]
        constraints = [models.UniqueConstraint(fields=["plan", "site"], name="uniq_plan_site_mapping")]

    def __str__(self) -> str:
        return f"{self.plan} @ {self.site}"

    def clean(self) -> None:
        errors = {}
        if self.site.vault_id != self.plan.vault_id:
            errors["site"] = f"The recovery site '{self.site.name}' belongs to another vault."
        for field, purpose in (("recovery_network", NetworkPurpose.RECOVERY), ("test_network", NetworkPurpose.TEST)):
            network = getattr(self, field)
            if network is None:
                continue
            if network.site_id != self.site_id:
                errors[field] = f"The network '{network.name}' is not a network of the recovery site {self.site.name}."
            elif network.purpose != purpose:
                errors[field] = (f"The network '{network.name}' is {network.get_purpose_display().lower()}, "
                                 f"not {NetworkPurpose(purpose).label.lower()}.")
        if errors:
            raise ValidationError(errors)


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


from recovery_plans.run_models import RecoveryPlanRun  # noqa: E402,F401  a plan's runs (recovery_plans.runs)
