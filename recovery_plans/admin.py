from django.contrib import admin

from recovery_plans.models import RecoveryPlan, RecoveryPlanAction, RecoveryPlanGroup


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
