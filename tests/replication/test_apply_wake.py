"""Apply passes on upload: a process server names the items it has just put logs into
storage for, and each gets a pass at once (replication/engine.py, "Passes on upload")."""
from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from replication.choices import ProtectionState as P
from replication.engine import apply_again_take, items_to_wake
from replication.lease import ApplyLease
from replication.models import ProtectedItem
from replication.tokens import process_server_token
from tests.factories import ProcessServerFactory, ProtectedItemFactory


@pytest.fixture
def anon():
    return APIClient()


def _post(anon, server, body, token=None):
    token = process_server_token(server=server) if token is None else token
    return anon.post(f"/api/v1/processServers/{server.pk}/uploaded", body, format="json",
                     HTTP_AUTHORIZATION=f"Bearer {token}")


@pytest.mark.django_db(transaction=True)
def test_wrong_token_and_bad_input_are_refused_and_wake_nothing(anon):
    item = ProtectedItemFactory(protection_state=P.PROTECTED)
    server, other = item.process_server, ProcessServerFactory(vault=item.vault)
    body = {"items": [str(item.pk)]}
    assert _post(anon, server, body, token="nope").status_code == 403
    # another server's token is not this one's
    assert _post(anon, server, body, token=process_server_token(server=other)).status_code == 403
    assert anon.post(f"/api/v1/processServers/{server.pk + 1000}/uploaded", body, format="json").status_code == 403
    for bad, words in (
        ({}, "required"),
        ({"items": []}, "empty"),
        ({"items": ["not-an-id"]}, "UUID"),
        ({"items": str(item.pk)}, "list"),
        ({"items": [str(uuid.uuid4()) for _ in range(1001)]}, "1000"),
    ):
        r = _post(anon, server, bad)
        assert r.status_code == 400, (bad, r.content)
        assert words in r.content.decode(), r.content
    assert apply_again_take(item.pk) is False  # nothing was marked by any of these


@pytest.mark.django_db(transaction=True)
def test_only_this_servers_replicating_items_with_a_free_lease_are_sent_a_pass(anon):
    free = ProtectedItemFactory(protection_state=P.PROTECTED)
    server = free.process_server
    expired = ProtectedItemFactory(vault=free.vault, process_server=server, protection_state=P.RESYNCING,
                                   apply_lease_until=timezone.now() - timedelta(seconds=5))
    busy = ProtectedItemFactory(vault=free.vault, process_server=server, protection_state=P.PROTECTED)
    elsewhere = ProtectedItemFactory(vault=free.vault, protection_state=P.PROTECTED)
    stopped = ProtectedItemFactory(vault=free.vault, process_server=server, protection_state=P.FAILED_OVER)
    lease = ApplyLease(busy.pk, renew=False)
    assert lease.take()
    r = _post(anon, server, {"items": [str(i.pk) for i in (free, expired, busy, elsewhere, stopped)] + [str(uuid.uuid4())]})
    assert r.status_code == 200, r.content
    assert r.json() == {"woken": 2}  # free and expired; busy's running pass runs again when it ends
    assert apply_again_take(busy.pk) is True and apply_again_take(busy.pk) is False
    lease.release()
    assert ProtectedItem.objects.get(pk=busy.pk).apply_lease_until is None


@pytest.mark.django_db(transaction=True)
def test_a_wake_up_while_a_pass_holds_the_item_is_seen_when_it_releases_it():
    """The order that loses nothing: the waker marks, then reads the lease; the pass clears
    the mark when it takes the lease and looks for it after releasing it."""
    item = ProtectedItemFactory(protection_state=P.PROTECTED)
    lease = ApplyLease(item.pk, renew=False)
    assert lease.take()
    assert items_to_wake([item.pk]) == []  # held: no second pass now...
    lease.release()
    assert apply_again_take(item.pk) is True  # ...but its holder runs again
    assert items_to_wake([item.pk], process_server_id=item.process_server_id) == [str(item.pk)]
    assert items_to_wake([item.pk], process_server_id=item.process_server_id + 1) == []
