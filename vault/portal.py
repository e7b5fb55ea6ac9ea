"""The vault the portal shows (registered with ``core.portal`` in VaultConfig.ready)."""
from __future__ import annotations

from django.http import HttpRequest

from core.filters import parse_id
from vault.models import Vault


def current_vault(request: HttpRequest) -> Vault | None:
    """The vault the portal shows: ?vault=<id> switches it, the session remembers it."""
    wanted = parse_id(request.GET.get("vault"))  # ASCII digits within bigint, or None
    if wanted is not None and Vault.objects.filter(pk=wanted).exists():
        request.session["vault_id"] = wanted
    vault_id = request.session.get("vault_id")
    vault = Vault.objects.filter(pk=vault_id).first() if vault_id else None
    if vault is None:
        vault = Vault.objects.order_by("name").first()
        if vault is not None:
            request.session["vault_id"] = vault.pk
    return vault
