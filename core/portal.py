"""Shared portal helpers: the current vault, HTMX partial rendering, polling stops."""
from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from vault.models import Vault

# htmx stops polling when a response has this status (the job or item reached a final state).
HTMX_STOP_POLLING = 286


def current_vault(request: HttpRequest) -> Vault | None:
    """The vault the portal shows: ?vault=<id> switches it, the session remembers it."""
    wanted = request.GET.get("vault")
    if wanted and wanted.isdigit() and Vault.objects.filter(pk=wanted).exists():
        request.session["vault_id"] = int(wanted)
    vault_id = request.session.get("vault_id")
    vault = Vault.objects.filter(pk=vault_id).first() if vault_id else None
    if vault is None:
        vault = Vault.objects.order_by("name").first()
        if vault is not None:
            request.session["vault_id"] = vault.pk
    return vault


def render_page(request: HttpRequest, template: str, context: dict, *, partial: str | None = None, status: int = 200) -> HttpResponse:
    """The whole page, or only ``partial`` of it for an HTMX request that targets it."""
    if partial and getattr(request, "htmx", False) and not request.htmx.boosted:
        return render(request, f"{template}#{partial}", context, status=status)
    return render(request, template, context, status=status)
