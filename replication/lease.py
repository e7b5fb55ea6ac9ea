"""The apply lease: one writer of an item's replica at a time.

An apply pass, a failover's own apply and a commit's pruning each hold the item's lease: a
compare-and-set on the row (``apply_lease_until`` in the past or empty -> now + length,
``apply_lease_owner`` -> the holder's token). While held it is renewed by a background
thread every third of its length, so a long pass never loses it; a holder that stops (a
worker frozen, its database unreachable) loses it after ``APPLY_LEASE_SECONDS`` and the
next taker goes on. Before it writes what the pass produced, the holder checks that it
still owns the lease (``check``): a holder that lost it writes nothing more.
"""
from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta

from django.db import connection
from django.db.models import Q
from django.utils import timezone

from core.exceptions import LifeboatError
from replication.models import ProtectedItem

logger = logging.getLogger(__name__)

APPLY_LEASE_SECONDS = 60


class LeaseLost(LifeboatError):
    """The holder of an apply lease no longer holds it: another may be writing."""


class ApplyLease:
    def __init__(self, item_id, *, seconds: float = APPLY_LEASE_SECONDS, renew: bool = True) -> None:
        self.item_id = item_id
        self.seconds = seconds
        self.token = uuid.uuid4().hex
        self._renew = renew
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def take(self) -> bool:
        """Take the lease if nobody holds it (compare-and-set); True if taken."""
        now = timezone.now()
        taken = bool(
            ProtectedItem.objects.filter(pk=self.item_id)
            .filter(Q(apply_lease_until__isnull=True) | Q(apply_lease_until__lt=now))
            .update(apply_lease_until=now + timedelta(seconds=self.seconds), apply_lease_owner=self.token)
        )
        if taken and self._renew:
            self._thread = threading.Thread(target=self._renewer, daemon=True, name=f"apply-lease-{self.item_id}")
            self._thread.start()
        return taken

    def renew(self) -> bool:
        """Push the lease's end on, if this holder still owns it and it has not run out."""
        now = timezone.now()
        held = bool(
            ProtectedItem.objects.filter(pk=self.item_id, apply_lease_owner=self.token, apply_lease_until__gte=now)
            .update(apply_lease_until=now + timedelta(seconds=self.seconds))
        )
        if not held:
            self.lost = True
        return held

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this holder still owns the lease (renewing it)."""
        if self.lost or not self.renew():
            raise LeaseLost(
                f"The apply lease of item {self.item_id} ran out before this pass wrote its result "
                "(another worker may apply it now); nothing more was written."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        ProtectedItem.objects.filter(pk=self.item_id, apply_lease_owner=self.token).update(
            apply_lease_until=None, apply_lease_owner="")

    def _renewer(self) -> None:
        try:
            while not self._stop.wait(self.seconds / 3):
                try:
                    if not self.renew():
                        logger.error("The apply lease of item %s was lost while held", self.item_id)
                        return
                except Exception:  # noqa: BLE001 - a database hiccup: try again next round
                    logger.exception("Could not renew the apply lease of item %s", self.item_id)
        finally:
            connection.close()

    def __enter__(self) -> "ApplyLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def apply_lease_take(item_id, *, seconds: float = APPLY_LEASE_SECONDS) -> ApplyLease | None:
    """Take the item's apply lease; the held lease (renewed until released), or None."""
    lease = ApplyLease(item_id, seconds=seconds)
    return lease if lease.take() else None


def apply_lease_release(lease_or_item_id) -> None:
    """Release a lease taken with ``apply_lease_take`` (or, given an item id, whatever lease
    the item has: for a test or an admin tool that took it by id)."""
    if isinstance(lease_or_item_id, ApplyLease):
        lease_or_item_id.release()
    else:
        ProtectedItem.objects.filter(pk=lease_or_item_id).update(apply_lease_until=None, apply_lease_owner="")
