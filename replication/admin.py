from django.contrib import admin

from replication.models import ProtectedItem, RecoveryPoint, ReplicaDisk


class ReplicaDiskInline(admin.TabularInline):
    model = ReplicaDisk
    extra = 0


@admin.register(ProtectedItem)
class ProtectedItemAdmin(admin.ModelAdmin):
    list_display = ["name", "vault", "protection_state", "test_failover_state", "health", "rpo_seconds"]
    list_filter = ["vault", "protection_state", "health"]
    search_fields = ["name"]
    inlines = [ReplicaDiskInline]


@admin.register(RecoveryPoint)
class RecoveryPointAdmin(admin.ModelAdmin):
    list_display = ["item", "time", "type", "seq"]
    list_filter = ["type"]


admin.site.register(ReplicaDisk)
