"""The vault the portal shows (registered with ``core.portal`` in VaultConfig.ready)."""
from __future__ import annotations

from django.http import HttpRequest

from core import access
from core.filters import parse_id
from vault.models import Vault


def visible_vaults(request: HttpRequest):
    """The vaults the signed-in user holds a role on (every vault for a superuser)."""
    return access.scoped(Vault.objects.order_by("name"), request.user, "pk")


def current_vault(request: HttpRequest) -> Vault | None:
    """The vault the portal shows: ?vault=<id> switches it, the session remembers it; only a
    vault the user holds a role on."""
    vaults = visible_vaults(request)
    wanted = parse_id(request.GET.get("vault"))  # ASCII digits within bigint, or None
    if wanted is not None and vaults.filter(pk=wanted).exists():
        request.session["vault_id"] = wanted
    vault_id = request.session.get("vault_id")
    vault = vaults.filter(pk=vault_id).first() if vault_id else None
    if vault is None:
        vault = vaults.first()
        if vault is not None:
            request.session["vault_id"] = vault.pk
    return vault
