from __future__ import annotations

from django.core.validators import MinValueValidator
from django.db import models

from core.models import TimeStampedModel


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
