"""Shared portal helpers: the current vault, HTMX partial rendering, polling stops."""
from __future__ import annotations

from typing import Any, Callable

from django.contrib import messages
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from core import access
from core.exceptions import PermissionDenied

# htmx stops polling when a response has this status (the job or item reached a final state).
HTMX_STOP_POLLING = 286

# How the portal finds the vault it shows; the vault app registers it (``vault.portal``) in
# its AppConfig.ready, so that core imports no app.
_vault_resolver: Callable[[HttpRequest], Any] | None = None


def vault_resolver(fn: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:
    global _vault_resolver
    _vault_resolver = fn
    return fn


def current_vault(request: HttpRequest):
    """The vault the portal shows (see ``vault.portal.current_vault``), or None."""
    return _vault_resolver(request) if _vault_resolver is not None else None


def render_page(request: HttpRequest, template: str, context: dict, *, partial: str | None = None, status: int = 200) -> HttpResponse:
    """The whole page, or only ``partial`` of it for an HTMX request that targets it."""
    if partial and getattr(request, "htmx", False) and not request.htmx.boosted:
        return render(request, f"{template}#{partial}", context, status=status)
    return render(request, template, context, status=status)


def filtered(request: HttpRequest, filterset):
    """The rows a portal table shows. A filter value that is not understood (``?vault=abc``,
    an id past 2^63, non-ASCII digits) shows a message saying so and no rows, never a 500."""
    if filterset.is_bound and not filterset.is_valid():
        for field, errors in filterset.errors.items():
            value = request.GET.get(field, "")
            messages.error(request, f"The filter {field}={value[:40]!r} was not understood: {' '.join(errors)}")
        return filterset.queryset.none()
    return filterset.qs


def require(request: HttpRequest, vault_id, action: str) -> None:
    """The portal's 403 (with the sentence saying which role it takes) unless the user's role
    on the vault allows ``action`` (``core.access``)."""
    try:
        access.require(request.user, vault_id, action)
    except PermissionDenied as exc:
        raise DjangoPermissionDenied(exc.message) from None


def visible_or_404(queryset, request: HttpRequest, path: str = "vault", **lookup):
    """The object, if it is in a vault the user holds a role on; 404 otherwise (as if it
    did not exist)."""
    return get_object_or_404(access.scoped(queryset, request.user, path), **lookup)
