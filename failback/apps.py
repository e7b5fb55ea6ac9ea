from django.apps import AppConfig


class FailbackConfig(AppConfig):
    name = "failback"
    verbose_name = "Failback"

    def ready(self) -> None:
        from failback import jobs  # noqa: F401  registers the job handlers
        from failback.plans import register

        register()  # failback of whole recovery plans, run by the plan runner
