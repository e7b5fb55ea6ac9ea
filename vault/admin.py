from django.contrib import admin

from vault import models as m


@admin.register(m.Vault)
class VaultAdmin(admin.ModelAdmin):
    list_display = ["name", "off_hours_start", "off_hours_end", "off_hours_time_zone", "created_at"]
    exclude = ["passphrase_hash", "seal_key_encrypted", "auth_key_encrypted"]


@admin.register(m.VCenter)
class VCenterAdmin(admin.ModelAdmin):
    list_display = ["name", "vault", "kind", "host", "port", "last_discovery_at"]
    list_filter = ["vault", "kind"]
    exclude = ["password_encrypted"]


class DiskInline(admin.TabularInline):
    model = m.DiscoveredDisk
    extra = 0


@admin.register(m.DiscoveredMachine)
class MachineAdmin(admin.ModelAdmin):
    list_display = ["name", "vault", "vcenter", "source", "power_state", "missing"]
    list_filter = ["vault", "source", "missing"]
    search_fields = ["name", "instance_uuid"]
    inlines = [DiskInline]


@admin.register(m.ReplicationPolicy)
class PolicyAdmin(admin.ModelAdmin):
    list_display = ["name", "vault", "storage_tier", "rpo_threshold_minutes", "recovery_point_retention_hours", "is_failback"]
    list_filter = ["vault", "is_failback"]


@admin.register(m.Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ["message", "vault", "severity", "state", "acknowledged", "raised_at"]
    list_filter = ["vault", "severity", "state", "acknowledged"]


@admin.register(m.Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["message", "vault", "severity", "kind", "created_at"]
    list_filter = ["vault", "severity", "kind"]


for model in (m.ConfigurationServer, m.ProcessServer, m.MasterTargetServer, m.DiscoveredDisk):
    admin.site.register(model)
