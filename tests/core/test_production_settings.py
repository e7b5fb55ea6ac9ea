"""Production settings that refuse to be unsafe: the system checks on the keys, the servers
that refuse to start on them, and the settings behind a TLS proxy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import override_settings

from core.checks import check_production_keys

ROOT = Path(__file__).resolve().parents[2]
GOOD_SIGNING = "s" * 20 + "-signing-key-for-the-tests-0123456789"
GOOD_SECRETS = "k" * 20 + "-secrets-key-for-the-tests-0123456789"


def ids(errors) -> list[str]:
    return [e.id for e in errors]


@override_settings(DEBUG=False, LIFEBOAT_DEMO=False, SECRET_KEY=GOOD_SIGNING, LIFEBOAT_SECRETS_KEY=GOOD_SECRETS)
def test_production_keys_pass():
    assert check_production_keys() == []


@pytest.mark.parametrize(
    "overrides, error_id, sentence",
    [
        ({"SECRET_KEY": "lifeboat-embedded-default-change-me-" + "x" * 24}, "lifeboat.E001",
         "SECRET_KEY is a default value that anyone can read in Lifeboat's source"),
        ({"SECRET_KEY": "change-me-in-production-please-0123456789"}, "lifeboat.E001", "SECRET_KEY is a default value"),
        ({"SECRET_KEY": "django-insecure-" + "a" * 40}, "lifeboat.E001", "SECRET_KEY is a default value"),
        ({"SECRET_KEY": "too-short-1234"}, "lifeboat.E001", "SECRET_KEY is shorter than 32 characters"),
        ({"LIFEBOAT_SECRETS_KEY": ""}, "lifeboat.E002", "LIFEBOAT_SECRETS_KEY is not set: it encrypts the secrets at rest"),
        ({"LIFEBOAT_SECRETS_KEY": "short"}, "lifeboat.E002", "LIFEBOAT_SECRETS_KEY is shorter than 32 characters"),
        ({"LIFEBOAT_SECRETS_KEY": GOOD_SIGNING}, "lifeboat.E003", "LIFEBOAT_SECRETS_KEY is the same as SECRET_KEY"),
    ],
)
def test_each_unsafe_key_is_an_error(overrides, error_id, sentence):
    settings = {"DEBUG": False, "LIFEBOAT_DEMO": False, "SECRET_KEY": GOOD_SIGNING, "LIFEBOAT_SECRETS_KEY": GOOD_SECRETS}
    with override_settings(**{**settings, **overrides}):
        errors = check_production_keys()
    assert ids(errors) == [error_id]
    assert errors[0].is_serious()  # ERROR level: check, migrate and runserver stop
    assert sentence in errors[0].msg
    assert errors[0].hint


@pytest.mark.parametrize("flag", ["DEBUG", "LIFEBOAT_DEMO"])
def test_debug_or_demo_accepts_the_embedded_defaults(flag):
    embedded = "lifeboat-embedded-default-change-me-" + "x" * 24
    with override_settings(DEBUG=False, LIFEBOAT_DEMO=False, SECRET_KEY=embedded, LIFEBOAT_SECRETS_KEY=""):
        assert ids(check_production_keys()) == ["lifeboat.E001", "lifeboat.E002"]
    with override_settings(**{"DEBUG": False, "LIFEBOAT_DEMO": False, flag: True}, SECRET_KEY=embedded, LIFEBOAT_SECRETS_KEY=""):
        assert check_production_keys() == []


def run_python(code: list[str], **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DEBUG", "LIFEBOAT_DEMO", "SECRET_KEY", "LIFEBOAT_SECRETS_KEY", "LIFEBOAT_BEHIND_TLS")}
    return subprocess.run([sys.executable, *code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120)


def test_manage_py_check_and_the_wsgi_app_refuse_to_start_without_keys():
    check = run_python(["manage.py", "check"])
    assert check.returncode == 1
    assert "(lifeboat.E001) SECRET_KEY is a default value" in check.stderr
    assert "(lifeboat.E002) LIFEBOAT_SECRETS_KEY is not set" in check.stderr

    # gunicorn imports lifeboat.wsgi and runs no system checks: the module refuses itself.
    wsgi = run_python(["-c", "import lifeboat.wsgi"], SECRET_KEY=GOOD_SIGNING)
    assert wsgi.returncode == 1
    assert "ImproperlyConfigured: Lifeboat refuses to start:\nlifeboat.E002: LIFEBOAT_SECRETS_KEY is not set" in wsgi.stderr

    ok = run_python(["-c", "import lifeboat.wsgi; print('started')"], SECRET_KEY=GOOD_SIGNING, LIFEBOAT_SECRETS_KEY=GOOD_SECRETS)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "started"
    demo = run_python(["manage.py", "check"], LIFEBOAT_DEMO="1")
    assert demo.returncode == 0, demo.stderr


PRINT_TLS = (
    "import json, django; django.setup(); from django.conf import settings as s; print(json.dumps({"
    "'proxy': s.SECURE_PROXY_SSL_HEADER, 'session': s.SESSION_COOKIE_SECURE, 'csrf': s.CSRF_COOKIE_SECURE,"
    "'hsts': s.SECURE_HSTS_SECONDS}))"
)


def test_tls_settings_follow_lifeboat_behind_tls():
    env = {"DJANGO_SETTINGS_MODULE": "lifeboat.settings", "LIFEBOAT_DEMO": "1"}
    plain = json.loads(run_python(["-c", PRINT_TLS], **env).stdout)
    assert plain == {"proxy": None, "session": False, "csrf": False, "hsts": 0}
    tls = json.loads(run_python(["-c", PRINT_TLS], LIFEBOAT_BEHIND_TLS="1", **env).stdout)
    assert tls == {"proxy": ["HTTP_X_FORWARDED_PROTO", "https"], "session": True, "csrf": True, "hsts": 365 * 24 * 3600}


@pytest.mark.django_db
@override_settings(SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"), SESSION_COOKIE_SECURE=True,
                   CSRF_COOKIE_SECURE=True, SECURE_HSTS_SECONDS=31536000)
def test_behind_tls_the_answers_carry_hsts_and_secure_cookies(client, admin_user):
    page = client.get("/login/", HTTP_X_FORWARDED_PROTO="https")
    assert page["Strict-Transport-Security"] == "max-age=31536000"
    assert page.cookies["csrftoken"]["secure"] is True
    signed_in = client.post("/login/", {"username": "admin", "password": "admin-pass-123"}, HTTP_X_FORWARDED_PROTO="https")
    assert signed_in.status_code == 302
    assert signed_in.cookies["sessionid"]["secure"] is True
    # Without the proxy's header the request is not https: no HSTS (browsers ignore it on http anyway).
    assert "Strict-Transport-Security" not in client.get("/login/")
