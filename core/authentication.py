"""DRF authentication by personal API tokens (``core.tokens``).

``Authorization: Bearer lbt_...`` (or ``Token lbt_...``). A header that carries no ``lbt_``
secret is left to the next class: the admin site's DRF tokens (``Token <40 hex>``) keep
working through ``rest_framework.authentication.TokenAuthentication``, and the agents'
endpoints check their own bearer tokens.
"""
from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from core.tokens import SECRET_PREFIX, TokenRefused, token_authenticate


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keywords = ("bearer", "token")

    def authenticate(self, request):
        parts = authentication.get_authorization_header(request).split()
        if len(parts) != 2 or parts[0].lower().decode("latin-1") not in self.keywords:
            return None
        try:
            secret = parts[1].decode("ascii")
        except UnicodeDecodeError:
            return None
        if not secret.startswith(SECRET_PREFIX):
            return None
        try:
            token = token_authenticate(secret)
        except TokenRefused as e:
            raise exceptions.AuthenticationFailed(str(e)) from None
        return token.user, token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


class ApiTokenScheme(OpenApiAuthenticationExtension):
    """The OpenAPI security scheme of ApiTokenAuthentication (drf-spectacular finds it here)."""

    target_class = "core.authentication.ApiTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer lbt_...`: a personal API token (POST /api/v1/apiTokens/ or the portal's API tokens page).",
        }
