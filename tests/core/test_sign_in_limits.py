"""Wrong sign-in passwords are limited per client address and per user name (core/signin.py,
core/throttling.py): past the limit, signing in is refused with a sentence, the right
password too, until the period is over; other users and addresses sign in as before. The
counts are shared by every process: Redis here, the file cache of the embedded demo in a
test of its own."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.test import Client, override_settings

from core.checks import check_failed_attempt_limits
from core.throttling import limit_parse

ROOT = Path(__file__).resolve().parents[2]
ATTACKER, OTHER, THIRD = "203.0.113.9", "198.51.100.7", "192.0.2.44"
SHORT = {"agent_register": "3/hour", "login": "3/hour"}
REFUSAL = "Too many failed sign-ins from this address or for this user name"


def sign_in(address: str, username: str, password: str, path: str = "/login/"):
    client = Client(REMOTE_ADDR=address)
    return client, client.post(path, {"username": username, "password": password})


def signed_in(answer) -> bool:
    return answer.status_code == 302


@pytest.fixture
def users(django_user_model):
    return (django_user_model.objects.create_user("admin", "a@example.com", "admin-pass-123", is_staff=True),
            django_user_model.objects.create_user("viewer", "v@example.com", "viewer-pass-123"))


def test_wrong_passwords_lock_the_address_and_the_user_name_out(db, users):
    for n in range(10):  # the shipped limit: 10 a minute
        _, answer = sign_in(ATTACKER, "admin", f"guess-{n}")
        assert answer.status_code == 200
        assert "didn't match" in answer.content.decode()
    client, refused = sign_in(ATTACKER, "admin", "admin-pass-123")
    assert refused.status_code == 429
    wait = int(refused["Retry-After"])
    assert 50 <= wait <= 60
    page = refused.content.decode()
    assert f"{REFUSAL}: signing in is refused for {wait} more seconds, even with the right password." in page
    assert "didn't match" not in page
    assert "_auth_user_id" not in client.session

    # The user name is locked out from everywhere; the address for every user name.
    assert sign_in(OTHER, "admin", "admin-pass-123")[1].status_code == 429
    assert sign_in(ATTACKER, "viewer", "viewer-pass-123")[1].status_code == 429
    # Another user from another address: as before.
    client, answer = sign_in(OTHER, "viewer", "viewer-pass-123")
    assert signed_in(answer) and client.session["_auth_user_id"] == str(users[1].pk)


def test_guesses_spread_over_many_addresses_still_lock_the_user_name(db, users):
    with override_settings(LIFEBOAT_FAILED_ATTEMPT_LIMITS=SHORT):
        for n in range(3):
            assert sign_in(f"203.0.113.{n + 20}", "Admin", f"guess-{n}")[1].status_code == 200
        assert sign_in(THIRD, "admin", "admin-pass-123")[1].status_code == 429  # names count case-blind
        assert signed_in(sign_in(THIRD, "viewer", "viewer-pass-123")[1])


def test_signing_in_works_again_once_the_period_is_over(db, users):
    with override_settings(LIFEBOAT_FAILED_ATTEMPT_LIMITS={"agent_register": "2/3s", "login": "2/3s"}):
        assert [sign_in(ATTACKER, "admin", f"guess-{n}")[1].status_code for n in range(2)] == [200, 200]
        refused = sign_in(ATTACKER, "admin", "admin-pass-123")[1]
        assert refused.status_code == 429
        time.sleep(int(refused["Retry-After"]) + 0.2)
        client, answer = sign_in(ATTACKER, "admin", "admin-pass-123")
        assert signed_in(answer) and client.session["_auth_user_id"] == str(users[0].pk)


def test_an_empty_password_is_not_a_guess(db, users):
    with override_settings(LIFEBOAT_FAILED_ATTEMPT_LIMITS=SHORT):
        for _ in range(5):
            assert sign_in(ATTACKER, "admin", "")[1].status_code == 200
        assert signed_in(sign_in(ATTACKER, "admin", "admin-pass-123")[1])


def test_the_admin_sites_sign_in_is_limited_too(db, users):
    with override_settings(LIFEBOAT_FAILED_ATTEMPT_LIMITS=SHORT):
        for n in range(3):
            assert sign_in(ATTACKER, "admin", f"guess-{n}", "/admin/login/")[1].status_code == 200
        client, refused = sign_in(ATTACKER, "admin", "admin-pass-123", "/admin/login/")
        assert refused.status_code == 200 and REFUSAL in refused.content.decode()
        assert "_auth_user_id" not in client.session
        # The count is the same as the portal's.
        assert sign_in(ATTACKER, "admin", "admin-pass-123")[1].status_code == 429


@pytest.mark.parametrize("text, count, period", [("10/min", 10, 60), ("5/30s", 5, 30), ("100/day", 100, 86400),
                                                 ("3 / 2 hours", 3, 7200)])
def test_limits_are_read_as_written(text, count, period):
    limit = limit_parse(text)
    assert (limit.count, limit.period) == (count, period)


@pytest.mark.parametrize("text", ["10", "ten/min", "0/min", "10/0s", "10/fortnight", ""])
def test_an_unreadable_limit_stops_the_checks_with_its_name(text):
    with override_settings(LIFEBOAT_FAILED_ATTEMPT_LIMITS={"agent_register": "10/min", "login": text}):
        errors = check_failed_attempt_limits()
    assert [e.id for e in errors] == ["lifeboat.E004"]
    assert errors[0].msg.startswith("LIFEBOAT_FAILED_ATTEMPT_LIMITS['login']: ") and "is not a limit like 10/min" in errors[0].msg
    assert "LIFEBOAT_LOGIN_FAILURE_LIMIT" in errors[0].hint


SIGN_IN_FAILS = """
import django, sys
django.setup()
from django.conf import settings
from core.throttling import failed_attempt_record, failed_attempts_wait
assert settings.CACHES["default"]["BACKEND"].endswith("FileBasedCache"), settings.CACHES
idents = [("address", "203.0.113.9")]
if sys.argv[1] == "fail":
    for _ in range(10):
        failed_attempt_record(scope="login", idents=idents)
print(failed_attempts_wait(scope="login", idents=idents))
"""


def test_the_embedded_demos_file_cache_is_shared_by_its_processes(tmp_path):
    """``make run`` has no Redis: its web workers share a file cache under the data folder.
    One process's wrong passwords lock the address out in another."""
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "LIFEBOAT_CACHE_URL")}
    env.update(DJANGO_SETTINGS_MODULE="lifeboat.settings", LIFEBOAT_DEMO="1", LIFEBOAT_DATA_DIR=str(tmp_path))

    def run(what: str) -> str:
        done = subprocess.run([sys.executable, "-c", SIGN_IN_FAILS, what], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("look") == "None"
    assert 55 <= int(run("fail")) <= 60
    assert 50 <= int(run("look")) <= 60
    assert os.listdir(tmp_path / "cache")


def test_a_cache_that_cannot_be_reached_locks_nobody_out(db, users, caplog):
    """A disaster may take Redis down with it: the admin must still be able to sign in and
    fail over. Nothing is limited meanwhile, and the log says so."""
    down = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}}
    with override_settings(CACHES=down, LIFEBOAT_FAILED_ATTEMPT_LIMITS={"agent_register": "1/hour", "login": "1/hour"}):
        for n in range(3):
            assert sign_in(ATTACKER, "admin", f"guess-{n}")[1].status_code == 200
        client, answer = sign_in(ATTACKER, "admin", "admin-pass-123")
        assert signed_in(answer) and client.session["_auth_user_id"] == str(users[0].pk)
    assert "cannot be read" in caplog.text and "wrong secrets are not limited until it is back" in caplog.text


def test_a_burst_across_a_windows_edge_still_locks(db, users):
    """Counts are kept per fixed window; the lock looks at the previous window's count too,
    so wrong passwords on both sides of an edge add up."""
    with override_settings(LIFEBOAT_FAILED_ATTEMPT_LIMITS={"agent_register": "4/2s", "login": "4/2s"}):
        now = time.time()
        edge = (now // 2 + 1) * 2
        if edge - now < 0.5:
            edge += 2
        time.sleep(edge - 0.3 - now)  # the last moments of a window ...
        assert [sign_in(ATTACKER, "admin", f"guess-{n}")[1].status_code for n in range(2)] == [200, 200]
        time.sleep(max(0.0, edge + 0.05 - time.time()))  # ... and the first of the next
        assert [sign_in(ATTACKER, "admin", f"guess-{n}")[1].status_code for n in range(2, 4)] == [200, 200]
        assert sign_in(ATTACKER, "admin", "admin-pass-123")[1].status_code == 429
