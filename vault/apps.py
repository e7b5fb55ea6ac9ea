from django.apps import AppConfig


class VaultConfig(AppConfig):
    name = "vault"
    verbose_name = "Recovery Services vault"

    def ready(self) -> None:
        # Late imports: models and handlers load once the app registry is ready.
        from core.access import register_authorizer
        from core.jobs import job_failure_listener
        from core.portal import vault_resolver
        from vault import discovery  # noqa: F401  registers the discovery job handler
        from vault.portal import current_vault
        from vault.roles import VaultRoles
        from vault.services import job_failure_recorded

        job_failure_listener(lambda job: job_failure_recorded(job=job))
        vault_resolver(current_vault)
        register_authorizer(VaultRoles())  # roles per vault, asked by every app through core.access
