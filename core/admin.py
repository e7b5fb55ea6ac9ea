from django.contrib import admin

from core.models import Job


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["type", "target_name", "state", "progress", "created_at", "ended_at"]
    list_filter = ["type", "state"]
    search_fields = ["target_name", "target_id", "error"]
    readonly_fields = [f.name for f in Job._meta.fields]
