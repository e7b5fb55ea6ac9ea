from django.apps import AppConfig


class RecoveryPlansConfig(AppConfig):
    name = "recovery_plans"
    verbose_name = "Recovery plans"

    def ready(self) -> None:
        from recovery_plans import jobs  # noqa: F401  registers the job handlers
        from recovery_plans import runs  # noqa: F401  registers the plan jobs' handler
