from django.contrib import admin

from recovery_plans.models import RecoveredVm, RecoveryPlan, RecoveryPlanAction, RecoveryPlanGroup


class GroupInline(admin.TabularInline):
    model = RecoveryPlanGroup
    extra = 0


@admin.register(RecoveryPlan)
class RecoveryPlanAdmin(admin.ModelAdmin):
    list_display = ["name", "vault"]
    inlines = [GroupInline]


class ActionInline(admin.TabularInline):
    model = RecoveryPlanAction
    extra = 0


@admin.register(RecoveryPlanGroup)
class RecoveryPlanGroupAdmin(admin.ModelAdmin):
    list_display = ["plan", "order", "name"]
    inlines = [ActionInline]


@admin.register(RecoveredVm)
class RecoveredVmAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "item", "site", "network", "power_state", "point_time", "created_at", "removed_at"]
    list_filter = ["kind", "site"]
    readonly_fields = ["disks", "verified_bytes", "point_id", "point_time", "point_type", "vm_id"]
