from django.apps import AppConfig


class ReplicationConfig(AppConfig):
    name = "replication"
    verbose_name = "Replication"

    def ready(self) -> None:
        from replication import jobs  # noqa: F401  registers the job handlers
