from django.apps import AppConfig


class FailbackConfig(AppConfig):
    name = "failback"
    verbose_name = "Failback"
