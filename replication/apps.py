from django.apps import AppConfig


class ReplicationConfig(AppConfig):
    name = "replication"
    verbose_name = "Replication"

    def ready(self) -> None:
        from replication import jobs  # noqa: F401  registers the job handlers
        from replication.disk_shape import machine_disks_changed
        from vault.signals import machine_disks_changed as disks_changed_signal

        disks_changed_signal.connect(lambda sender, changes, **_: machine_disks_changed(changes=changes),
                                     weak=False, dispatch_uid="replication.disk_shape")
