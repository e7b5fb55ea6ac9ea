"""Limits on wrong secrets: agents' registration passphrases and portal sign-in passwords.

A vault passphrase or a password can be guessed only by trying it, so the tries are what is
limited. Once a client address has sent ``N`` wrong secrets within one period (the scope's
limit, ``LIFEBOAT_FAILED_ATTEMPT_LIMITS``, e.g. "10/min"), that address is locked out of the
scope for one whole period: every attempt is refused, the right secret too, with the time
left. Sign-ins also count per user name, so guesses spread over many addresses still get
``N`` tries a period at one account. Right secrets are never counted: agents installed by the
hundred from one address register as fast as they come.

Counts and locks live in Django's default cache, which every web process shares (settings:
Redis beside the broker, or a file cache under LIFEBOAT_DATA_DIR in the embedded demo). A
count is keyed by the number of its period (fixed windows), so that a wrong secret costs one
increment, atomic in Redis, and each backend's own expiry ends it. The lock is decided on
the current window's count and the previous one's together: ``N`` wrong secrets within any
one period always lock (a burst across a window's edge too), and a client never gets more
than ``N - 1`` in two windows. A lock is one key that expires a period after the try that
set it.

Where a client address comes from: ``client_address``.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import re
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from redis.exceptions import RedisError
from rest_framework import exceptions as drf_exceptions
from rest_framework.throttling import BaseThrottle

log = logging.getLogger(__name__)

KEY_PREFIX = "failures"
CACHE_ERRORS = (RedisError, OSError)  # Redis unreachable; the file cache's disk
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?\s*$")


@dataclass(frozen=True)
class Limit:
    """``count`` wrong secrets allowed per ``period`` seconds; the lock-out lasts ``period``."""

    count: int
    period: int


def limit_parse(text: str) -> Limit:
    """"10/min", "5/30s", "100/day" (s, min, hour, day; a number before the unit multiplies it)."""
    match = _LIMIT.match(str(text).lower())
    if not match or match.group(3) not in _UNITS or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
        raise ValueError(f"{text!r} is not a limit like 10/min (a count of 1 or more, then s, min, hour or day)")
    return Limit(count=int(match.group(1)), period=int(match.group(2) or 1) * _UNITS[match.group(3)])


def limit_for(scope: str) -> Limit:
    limits = getattr(settings, "LIFEBOAT_FAILED_ATTEMPT_LIMITS", {})
    if scope not in limits:
        raise ImproperlyConfigured(f"LIFEBOAT_FAILED_ATTEMPT_LIMITS has no limit for {scope!r}")
    try:
        return limit_parse(limits[scope])
    except ValueError as e:
        raise ImproperlyConfigured(f"LIFEBOAT_FAILED_ATTEMPT_LIMITS[{scope!r}]: {e}") from None


def client_address(request) -> str:
    """The address a request's wrong secrets count against: REMOTE_ADDR, or, behind
    LIFEBOAT_NUM_PROXIES proxies, the address the outermost of them saw (X-Forwarded-For,
    that many entries from the right; the header is ignored without proxies, since any
    client can write it). An IPv6 address counts as its /64: one host usually holds the
    whole block."""
    text = BaseThrottle().get_ident(request) or ""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return text.strip()[:100] or "unknown"
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _digest(kind: str, value: str) -> str:
    # Names typed at a sign-in page are any text: the key holds a digest of them.
    return hashlib.sha256(f"{kind}\0{value}".encode()).hexdigest()[:32]


def _lock_key(scope: str, ident: tuple[str, str]) -> str:
    return f"{KEY_PREFIX}:{scope}:lock:{_digest(*ident)}"


def _count_key(scope: str, ident: tuple[str, str], window: int) -> str:
    return f"{KEY_PREFIX}:{scope}:count:{_digest(*ident)}:{window}"


def _cache_down(what: str, error: Exception) -> None:
    log.error("the cache holding the counts of wrong passphrases and passwords cannot be %s (%s): "
              "wrong secrets are not limited until it is back", what, error)


def failed_attempts_wait(*, scope: str, idents: list[tuple[str, str]]) -> int | None:
    """Whole seconds until ``scope`` takes attempts again from any of ``idents`` (each a
    (kind, value) pair, e.g. ("address", "192.0.2.7")), or None when none is locked out.

    A cache that cannot be read locks nobody out (and says so in the log): Lifeboat is what
    an admin signs in to during a disaster, which may have taken Redis with it."""
    try:
        until = cache.get_many([_lock_key(scope, ident) for ident in idents])
    except CACHE_ERRORS as e:
        _cache_down("read", e)
        return None
    if not until:
        return None
    left = max(until.values()) - time.time()
    return max(1, math.ceil(left)) if left > 0 else None


def failed_attempt_record(*, scope: str, idents: list[tuple[str, str]]) -> None:
    """Count one wrong secret against each of ``idents``; one that reaches the scope's limit
    is locked out for a period from now."""
    limit = limit_for(scope)
    try:
        _record(scope, idents, limit)
    except CACHE_ERRORS as e:
        _cache_down("written", e)


def _record(scope: str, idents: list[tuple[str, str]], limit: Limit) -> None:
    now = time.time()
    window = int(now // limit.period)
    for ident in idents:
        key = _count_key(scope, ident, window)
        cache.add(key, 0, timeout=2 * limit.period)
        try:
            count = cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout=2 * limit.period)
            count = 1
        # The file and database caches' incr writes the value back with their default
        # timeout: keep the count for its window and the next, however long the period.
        cache.touch(key, 2 * limit.period)
        previous = cache.get(_count_key(scope, ident, window - 1), 0)
        if count + previous >= limit.count:
            cache.set(_lock_key(scope, ident), now + limit.period, timeout=limit.period)


class TooManyFailedAttempts(drf_exceptions.Throttled):
    """429 with Retry-After (core.api.exception_handler) and a sentence that says what was
    refused and for how long."""

    default_code = "too_many_attempts"
    extra_detail_singular = "Try again in {wait} second."
    extra_detail_plural = "Try again in {wait} seconds."


class FailedAttemptThrottle(BaseThrottle):
    """DRF throttle of a view that takes a secret: a client address locked out of ``scope``
    is refused before the view runs. It counts nothing itself: the view calls
    ``failed(request)`` when the secret is wrong, so right ones never count. It raises its
    own ``TooManyFailedAttempts`` rather than returning False, so that the answer says which
    secret was refused instead of DRF's generic sentence."""

    scope = ""
    refusal = "Too many wrong secrets from this address."

    def allow_request(self, request, view) -> bool:
        wait = failed_attempts_wait(scope=self.scope, idents=[("address", client_address(request))])
        if wait is not None:
            raise TooManyFailedAttempts(wait=wait, detail=self.refusal)
        return True

    @classmethod
    def failed(cls, request) -> None:
        failed_attempt_record(scope=cls.scope, idents=[("address", client_address(request))])
