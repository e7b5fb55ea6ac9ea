from django.apps import AppConfig


class VaultConfig(AppConfig):
    name = "vault"
    verbose_name = "Recovery Services vault"

    def ready(self) -> None:
        from vault import discovery  # noqa: F401  registers the discovery job handler
