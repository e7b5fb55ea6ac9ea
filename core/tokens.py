"""Personal API tokens: made, found and revoked here (views and the API call these).

A token's secret is ``lbt_`` and 43 URL-safe characters (256 random bits). Lifeboat keeps its
SHA-256 only: a high-entropy secret needs no slow hash, and a leaked table gives no token.
The secret is returned once, by ``token_create``.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.db.models import Q
from django.utils import timezone

from core.exceptions import NotFound, ValidationFailed
from core.models import ApiToken
from core.validators import single_line

SECRET_PREFIX = "lbt_"
# last_used_at is written at most this often per token (one UPDATE, not one per request).
LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_ACTIVE_TOKENS = 50


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def token_create(*, user, name: str, expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """A new token for ``user``; returns it and its secret (never available again)."""
    name = (name or "").strip()
    if not name:
        raise ValidationFailed("A token needs a name, to tell it apart later.")
    if len(name) > 100:
        raise ValidationFailed("A token's name is at most 100 characters.")
    try:
        single_line(name)
    except ValidationError as e:
        raise ValidationFailed(e.messages[0]) from None
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationFailed("The expiry must be in the future.")
    if token_active(ApiToken.objects.filter(user=user)).count() >= MAX_ACTIVE_TOKENS:
        raise ValidationFailed(f"You have {MAX_ACTIVE_TOKENS} active tokens already: revoke one you no longer use first.")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user, name=name, prefix=secret[: len(SECRET_PREFIX) + 6], digest=token_digest(secret), expires_at=expires_at
    )
    return token, secret


def token_revoke(*, user, token_id: int) -> ApiToken:
    """Revoke one of ``user``'s own tokens (revoking twice changes nothing)."""
    token = ApiToken.objects.filter(user=user, pk=token_id).first() if 0 < int(token_id) < 2**63 else None
    if token is None:
        raise NotFound("You have no API token with this id.")
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    return token


def token_active(queryset):
    now = timezone.now()
    return queryset.filter(revoked_at__isnull=True).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))


class TokenRefused(Exception):
    """The secret names no usable token; the message says why (shown with the 401)."""


def token_authenticate(secret: str) -> ApiToken:
    """The token ``secret`` belongs to, if it may be used now; its last-used time is updated
    (at most once a minute). Raises TokenRefused with a sentence otherwise."""
    digest = token_digest(secret)
    token = ApiToken.objects.select_related("user").filter(digest=digest).first()
    # The lookup is by digest; the comparison below is constant-time all the same.
    if token is None or not hmac.compare_digest(token.digest, digest):
        raise TokenRefused("This API token is not known: check that it was copied whole, or create a new one.")
    now = timezone.now()
    if token.revoked_at:
        raise TokenRefused(f"This API token ({token.name!r}) was revoked on {token.revoked_at:%Y-%m-%d %H:%M} UTC.")
    if token.expires_at and token.expires_at <= now:
        raise TokenRefused(f"This API token ({token.name!r}) expired on {token.expires_at:%Y-%m-%d %H:%M} UTC.")
    if not token.user.is_active:
        raise TokenRefused("The account this API token belongs to is disabled.")
    if token.last_used_at is None or token.last_used_at <= now - LAST_USED_RESOLUTION:
        # Conditional, so that concurrent requests write it once.
        ApiToken.objects.filter(pk=token.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
        ).update(last_used_at=now)
        token.last_used_at = now
    return token
