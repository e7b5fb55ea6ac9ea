"""A failback: one protected item's way home from the recovery site.

The item that failed over (``item``) stays the admin's handle; while its recovered VM
replicates back, that stream is a protected item of its own (``returning_item``, direction
recovery to primary), with its own agent, process server (in the recovery site), replica,
state, health, RPO and recovery points, so that everything replication does in one
direction it does in the other. The master target server applies it on-premises and writes
the on-premises disks at the failover: the original VM's, or a new VM's at an alternate
location.
"""
from __future__ import annotations

import uuid

from django.db import models

from core.models import TimeStampedModel
from failback.transitions import FailbackState


class FailbackLocation(models.TextChoices):
    ORIGINAL = "ORIGINAL", "Original location (the on-premises VM's own disks)"
    ALTERNATE = "ALTERNATE", "Alternate location (a new VM on another host, datastore or vCenter)"


class Failback(TimeStampedModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vault = models.ForeignKey("vault.Vault", on_delete=models.CASCADE, related_name="failbacks")
    item = models.ForeignKey("replication.ProtectedItem", on_delete=models.CASCADE, related_name="failbacks",
                             help_text="The protected item that failed over and comes home.")
    returning_item = models.OneToOneField(
        "replication.ProtectedItem", on_delete=models.SET_NULL, null=True, blank=True, related_name="returning_for",
        editable=False, help_text="The replication of the recovered VM back on-premises.",
    )
    state = models.CharField(max_length=24, choices=FailbackState.choices, default=FailbackState.REPROTECTING,
                             editable=False, db_index=True)
    location = models.CharField(max_length=16, choices=FailbackLocation.choices, default=FailbackLocation.ORIGINAL)
    vcenter = models.ForeignKey("vault.VCenter", on_delete=models.PROTECT, related_name="failbacks",
                                help_text="The on-premises vCenter the VM comes back to.")
    # Alternate location: where the new VM is made (its name, host, datastore and network).
    target_name = models.CharField(max_length=80, blank=True)
    target_host = models.CharField(max_length=255, blank=True)
    target_datastore = models.CharField(max_length=255, blank=True)
    target_network = models.CharField(max_length=255, blank=True)
    # The on-premises VM that runs after the failback: the original VM, or the new one.
    target_vm_uuid = models.CharField(max_length=64, blank=True, editable=False)
    process_server = models.ForeignKey("vault.ProcessServer", on_delete=models.PROTECT, related_name="failbacks",
                                       help_text="The process server in the recovery site the recovered VM sends to.")
    master_target = models.ForeignKey("vault.MasterTargetServer", on_delete=models.PROTECT, related_name="failbacks",
                                      help_text="The master target server that writes the on-premises disks.")
    recovered_vm = models.ForeignKey("recovery_plans.RecoveredVm", on_delete=models.PROTECT, related_name="failbacks",
                                     help_text="The failed-over VM that replicates back.")
    # What each step moved and took: {"reprotect": {...}, "failback": {...}, "reenable": {...}}.
    figures = models.JSONField(default=dict, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["item"], condition=~models.Q(state="COMPLETED"), name="uniq_active_failback"),
        ]

    def __str__(self) -> str:
        return f"failback of {self.item}"

    @property
    def active(self) -> bool:
        return self.state in FailbackState.ACTIVE
