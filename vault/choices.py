from django.db import models


class Health(models.TextChoices):
    HEALTHY = "HEALTHY", "Healthy"
    WARNING = "WARNING", "Warning"
    CRITICAL = "CRITICAL", "Critical"


class Severity(models.TextChoices):
    INFO = "INFO", "Information"
    WARNING = "WARNING", "Warning"
    CRITICAL = "CRITICAL", "Critical"


class Site(models.TextChoices):
    PRIMARY = "PRIMARY", "Primary (on-premises)"
    RECOVERY = "RECOVERY", "Recovery"


class VCenterKind(models.TextChoices):
    VCENTER = "vcenter", "vCenter / ESXi"
    SIMULATED = "simulated", "Simulated VMware site"


class MachineSource(models.TextChoices):
    VCENTER = "vcenter", "Discovered from vCenter"
    AGENT = "agent", "Registered by its mobility agent"


class StorageTier(models.TextChoices):
    PREMIUM = "premium", "Premium"
    STANDARD = "standard", "Standard"


# The longest recovery point retention each storage tier allows, in hours.
MAX_RETENTION_HOURS = {StorageTier.PREMIUM: 24, StorageTier.STANDARD: 72}


class AlertState(models.TextChoices):
    ACTIVE = "ACTIVE", "Active"
    RESOLVED = "RESOLVED", "Resolved"
