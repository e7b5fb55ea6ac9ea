"""Shared fixtures: the real PostgreSQL database, a real Celery worker on Redis, factories."""
from __future__ import annotations

import os
import time

import pytest
from django.conf import settings

IN_CI = os.environ.get("CI", "").lower() == "true"


def peer_missing(reason: str):
    """A peer the test needs is missing: fail in CI (a skip there hides a missing install
    step), skip with the reason on a developer's machine."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: peers must be installed by `make test`)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config):
    # Hashing passphrases at full strength costs a third of a second each; tests build many.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    engine = settings.DATABASES["default"]["ENGINE"]
    if IN_CI and "postgresql" not in engine:
        raise pytest.UsageError("CI runs the suite on PostgreSQL: set DATABASE_URL (make test does).")


@pytest.fixture(scope="session")
def celery_app_real():
    from lifeboat.celery import app

    broker = app.conf.broker_url
    if IN_CI and not str(broker).startswith("redis://"):
        raise pytest.UsageError("CI runs tasks through Redis: set CELERY_BROKER_URL (make test does).")
    return app


@pytest.fixture(scope="session")
def celery_worker_session(celery_app_real, django_db_setup, django_db_blocker):
    """One real worker thread consuming every queue from the real broker for the session."""
    from celery.contrib.testing.worker import start_worker

    from core.queues import ALL

    with celery_app_real.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=1)
        except Exception as exc:  # noqa: BLE001 - the message says which broker
            peer_missing(f"The Celery broker {celery_app_real.conf.broker_url} is not reachable: {exc}")
        for queue in ALL:
            try:
                conn.default_channel.queue_purge(queue)
            except Exception:  # noqa: BLE001 - a queue that does not exist yet has nothing to purge
                pass
    with django_db_blocker.unblock():
        with start_worker(
            celery_app_real,
            pool="threads",
            concurrency=4,
            perform_ping_check=False,
            queues=list(ALL),
            shutdown_timeout=30,
        ) as worker:
            yield worker


@pytest.fixture
def celery_worker(celery_worker_session, transactional_db):
    """A test that runs tasks needs committed rows (the worker has its own connection)."""
    return celery_worker_session


@pytest.fixture(autouse=True)
def no_failed_attempts_carried_over():
    """Counts of wrong passphrases and passwords (core/throttling.py) live in the shared cache,
    Redis, which outlives a test: each test starts as if no client had ever got one wrong.
    Only those keys go: the broker's share the database."""
    from django.core.cache import cache
    from django.core.cache.backends.redis import RedisCache

    if not isinstance(cache, RedisCache):
        cache.clear()
        return
    import redis

    client = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])
    try:
        keys = list(client.scan_iter(match=f"{settings.CACHES['default']['KEY_PREFIX']}:*:failures:*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.ConnectionError:
        pass  # no Redis here: the tests that need it say so themselves
    finally:
        client.close()


def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.1, message: str = "condition"):
    """Poll until ``predicate()`` is truthy; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def bookmarked_point(item, bookmark: dict, *, timeout: float = 120.0, interval: float = 0.1, message: str = ""):
    """Wait for the recovery point a bookmark cut, found by the bookmark's id: its label
    names the second it was asked for, which an earlier point can share."""
    from replication.engine import applier_for
    from replication.models import RecoveryPoint

    def cut():
        for rp in RecoveryPoint.objects.filter(item=item, label=bookmark["label"]).order_by("-seq"):
            label = applier_for(item).get_point(rp.point_id).label
            if isinstance(label, dict) and label.get("id") == bookmark["id"]:
                return rp
        return None

    return wait_for(cut, timeout=timeout, interval=interval, message=message or f"the point bookmark {bookmark['id']} cut")


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_user("admin", "admin@example.com", "admin-pass-123", is_staff=True, is_superuser=True)


@pytest.fixture
def viewer_user(django_user_model):
    return django_user_model.objects.create_user("viewer", "viewer@example.com", "viewer-pass-123")


@pytest.fixture
def api(admin_user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(admin_user)
    return client


@pytest.fixture
def vault(db):
    from tests.factories import VaultFactory

    return VaultFactory()


def grant_role(user, vault, role: str = "READER"):
    """Give ``user`` a role on ``vault`` (vault.roles), as an owner would."""
    from vault.roles import role_assign

    return role_assign(vault=vault, role=role, user=user)
