"""System checks that refuse unsafe production settings.

With DEBUG off (and not the demo, LIFEBOAT_DEMO=1), a missing or default SECRET_KEY or
LIFEBOAT_SECRETS_KEY, or one key used for both, is an error: ``manage.py check``, ``migrate``
and ``runserver`` stop on it, and ``lifeboat.wsgi``/``lifeboat.asgi`` call
``refuse_unsafe_settings`` so that gunicorn does not start either.
"""
from __future__ import annotations

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from core.throttling import limit_parse

MIN_KEY_LENGTH = 32
# Values that were shipped as examples or defaults: never a production key.
KNOWN_DEFAULTS = {
    "change-me-in-production-please-0123456789",
    "lifeboat-embedded-default-change-me-" + "x" * 24,
}
HOW = "Set it in the environment to a long random value, e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))'"


def _weak(value: str) -> str | None:
    if not value:
        return "is not set"
    if value in KNOWN_DEFAULTS or value == getattr(settings, "EMBEDDED_SECRET_KEY", None) or value.startswith("django-insecure"):
        return "is a default value that anyone can read in Lifeboat's source"
    if len(value) < MIN_KEY_LENGTH:
        return f"is shorter than {MIN_KEY_LENGTH} characters"
    return None


@checks.register(checks.Tags.security)
def check_production_keys(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    if settings.DEBUG or getattr(settings, "LIFEBOAT_DEMO", False):
        return []
    errors = []
    try:
        secret_key = settings.SECRET_KEY
    except ImproperlyConfigured:  # Django refuses an empty one on access
        secret_key = ""
    problem = _weak(secret_key)
    if problem:
        errors.append(checks.Error(
            f"SECRET_KEY {problem}: it signs sessions and CSRF tokens, so Lifeboat does not start with it (DEBUG is off).",
            hint=f"{HOW}. For the demo only, set LIFEBOAT_DEMO=1 (make run does).",
            id="lifeboat.E001",
        ))
    secrets_key = getattr(settings, "LIFEBOAT_SECRETS_KEY", "")
    problem = _weak(secrets_key)
    if problem:
        errors.append(checks.Error(
            f"LIFEBOAT_SECRETS_KEY {problem}: it encrypts the secrets at rest (vCenter passwords, vault keys), "
            "so Lifeboat does not start without its own key (DEBUG is off).",
            hint=f"{HOW}, different from SECRET_KEY, and keep it: secrets stored with it cannot be read without it.",
            id="lifeboat.E002",
        ))
    elif secrets_key == secret_key:
        errors.append(checks.Error(
            "LIFEBOAT_SECRETS_KEY is the same as SECRET_KEY: the key that encrypts secrets at rest must be "
            "a separate one, so that the signing key can be rotated or leaked without exposing them.",
            hint="Give LIFEBOAT_SECRETS_KEY its own long random value.",
            id="lifeboat.E003",
        ))
    return errors


@checks.register()
def check_failed_attempt_limits(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """The limits on wrong passphrases and passwords (core/throttling.py) must be readable:
    a typo would otherwise surface as a server error at the first wrong one."""
    errors = []
    for scope, text in getattr(settings, "LIFEBOAT_FAILED_ATTEMPT_LIMITS", {}).items():
        try:
            limit_parse(text)
        except ValueError as e:
            errors.append(checks.Error(
                f"LIFEBOAT_FAILED_ATTEMPT_LIMITS[{scope!r}]: {e}.",
                hint="Set LIFEBOAT_REGISTER_FAILURE_LIMIT / LIFEBOAT_LOGIN_FAILURE_LIMIT to a value like 10/min.",
                id="lifeboat.E004",
            ))
    return errors


def refuse_unsafe_settings() -> None:
    """Raise ImproperlyConfigured (the checks' messages) for the servers that do not run the
    system checks themselves (gunicorn, uvicorn)."""
    errors = check_production_keys()
    if errors:
        raise ImproperlyConfigured("Lifeboat refuses to start:\n" + "\n".join(
            f"{e.id}: {e.msg} HINT: {e.hint}" for e in errors))
