"""Wrong registration passphrases are limited per client address (core/throttling.py): past
the limit the address is refused (429, Retry-After, a sentence) and registers nothing, the
right passphrase included, while other addresses register as before. The counts are in the
shared cache (Redis), so every web process sees them: checked with a real gunicorn."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings
from rest_framework.test import APIClient

from replication.models import MobilityAgent
from tests.conftest import peer_missing, wait_for
from tests.factories import VaultFactory
from vault.models import DiscoveredMachine

ROOT = Path(__file__).resolve().parents[2]
PASS = "correct horse battery staple"
ATTACKER, OTHER = "203.0.113.9", "198.51.100.7"


def body(passphrase: str, name: str = "files-01") -> dict:
    return {"passphrase": passphrase, "hostname": f"{name}.corp",
            "machine": {"name": name, "disks": [{"key": 0, "path": "/dev/sda", "capacity_bytes": 8 * 1024 * 1024}]}}


def register(address: str, passphrase: str, name: str = "files-01", **headers):
    return APIClient(REMOTE_ADDR=address).post("/api/v1/agents/register", body(passphrase, name), format="json", **headers)


def test_wrong_passphrases_past_the_limit_lock_the_address_out_and_register_nothing(db):
    VaultFactory(passphrase=PASS)
    # The shipped limit: 10 wrong passphrases a minute. A forged X-Forwarded-For changes
    # nothing: without proxies configured, the header is not believed.
    for n in range(10):
        answer = register(ATTACKER, f"guess number {n}", HTTP_X_FORWARDED_FOR=f"10.0.0.{n}")
        assert (answer.status_code, answer.json()["error"]["code"]) == (403, "bad_passphrase"), answer.content
    for passphrase in ("guess number 10", PASS):  # the right one too, from this address
        refused = register(ATTACKER, passphrase)
        assert refused.status_code == 429, refused.content
        error = refused.json()["error"]
        assert error["code"] == "too_many_attempts"
        wait = int(refused["Retry-After"])
        assert 50 <= wait <= 60
        assert error["message"] == (f"Too many wrong registration passphrases from this address. "
                                    f"Try again in {wait} seconds.")
    assert not MobilityAgent.objects.exists() and not DiscoveredMachine.objects.exists()

    # Another address registers with the right passphrase as if nothing happened.
    other = register(OTHER, PASS)
    assert other.status_code == 201, other.content
    assert list(MobilityAgent.objects.values_list("hostname", flat=True)) == ["files-01.corp"]


def test_right_passphrases_are_never_counted(db):
    """A whole site installed from behind one address registers as fast as it comes."""
    VaultFactory(passphrase=PASS)
    with override_settings(LIFEBOAT_FAILED_ATTEMPT_LIMITS={"agent_register": "3/hour", "login": "3/hour"}):
        for n in range(8):
            answer = register(ATTACKER, PASS, name=f"vm-{n}")
            assert answer.status_code == 201, answer.content
        assert register(ATTACKER, "one wrong one").status_code == 403
        assert register(ATTACKER, PASS, name="vm-8").status_code == 201
    assert MobilityAgent.objects.count() == 9


def test_the_lock_out_ends_after_one_period(db):
    VaultFactory(passphrase=PASS)
    with override_settings(LIFEBOAT_FAILED_ATTEMPT_LIMITS={"agent_register": "2/3s", "login": "2/3s"}):
        assert [register(ATTACKER, f"guess {n}").status_code for n in range(2)] == [403, 403]
        refused = register(ATTACKER, PASS)
        assert refused.status_code == 429 and 1 <= int(refused["Retry-After"]) <= 3
        time.sleep(int(refused["Retry-After"]) + 0.2)
        assert register(ATTACKER, PASS).status_code == 201
    assert MobilityAgent.objects.count() == 1


def test_an_ipv6_client_counts_as_its_64_block(db):
    """One host holds a whole /64: changing the address inside it does not reset the count."""
    VaultFactory(passphrase=PASS)
    with override_settings(LIFEBOAT_FAILED_ATTEMPT_LIMITS={"agent_register": "3/hour", "login": "3/hour"}):
        for n in range(3):
            assert register(f"2001:db8:1:2::{n + 1:x}", f"guess {n}").status_code == 403
        assert register("2001:db8:1:2:ffff::9", PASS).status_code == 429
        assert register("2001:db8:1:3::1", PASS).status_code == 201


def test_behind_a_proxy_the_address_it_saw_is_counted(db):
    """With LIFEBOAT_NUM_PROXIES=1 the proxy's own entry (the rightmost) names the client;
    what the client wrote further left is not believed."""
    VaultFactory(passphrase=PASS)
    rest = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    with override_settings(REST_FRAMEWORK=rest,
                           LIFEBOAT_FAILED_ATTEMPT_LIMITS={"agent_register": "3/hour", "login": "3/hour"}):
        for n in range(3):
            forged = f"10.1.1.{n}, {ATTACKER}"
            assert register("192.0.2.1", f"guess {n}", HTTP_X_FORWARDED_FOR=forged).status_code == 403
        assert register("192.0.2.1", PASS, HTTP_X_FORWARDED_FOR=ATTACKER).status_code == 429
        assert register("192.0.2.1", PASS, HTTP_X_FORWARDED_FOR=OTHER).status_code == 201


# --- several web processes --------------------------------------------------------------------------


def _post(port: int, source: str, passphrase: str, name: str) -> tuple[int, dict, dict]:
    """One registration on a fresh connection from ``source`` (a loopback address)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        conn.request("POST", "/api/v1/agents/register", json.dumps(body(passphrase, name)),
                     {"Content-Type": "application/json", "Connection": "close"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}"), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


@pytest.fixture
def gunicorn(transactional_db, tmp_path):
    """The web service as production runs it: gunicorn with two worker processes, on the
    test database and the same Redis."""
    db = connection.settings_dict
    port = _free_port()
    env = {**os.environ, "LIFEBOAT_DEMO": "1", "LIFEBOAT_DATA_DIR": str(tmp_path),
           "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}",
           "CELERY_BROKER_URL": settings.CELERY_BROKER_URL}
    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        peer_missing("the shared cache is Redis: set CELERY_BROKER_URL to a Redis URL")
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "lifeboat.wsgi", "-b", f"127.0.0.1:{port}", "-w", "2"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def up():
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "gunicorn.log").read_text())
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/login/")
            return True
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, message="gunicorn to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_web_process_sees_the_same_counts(gunicorn):
    """Wrong passphrases sent to gunicorn (a connection each, taken by either worker) lock
    the address out in every worker, and in this process too, which shares nothing with
    them but Redis."""
    # The subprocesses hash as production does; the tests' fast hasher is not theirs.
    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.PBKDF2PasswordHasher"]):
        VaultFactory(passphrase=PASS)
    statuses = [_post(gunicorn, "127.0.0.3", f"guess {n}", "files-01")[0] for n in range(10)]
    assert statuses == [403] * 10
    for n in range(4):  # fresh connections: whichever worker takes them refuses
        status, answer, headers = _post(gunicorn, "127.0.0.3", PASS, "files-01")
        assert status == 429 and answer["error"]["code"] == "too_many_attempts" and int(headers["retry-after"]) >= 1
    assert register("127.0.0.3", PASS).status_code == 429  # this process reads the same counts
    status, answer, _ = _post(gunicorn, "127.0.0.4", PASS, "files-02")
    assert status == 201, answer
    assert list(MobilityAgent.objects.values_list("hostname", flat=True)) == ["files-02.corp"]
