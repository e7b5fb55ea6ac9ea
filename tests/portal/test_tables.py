"""The portal's tables (items, jobs, alerts, events, machines): sorted by a clicked column,
filtered, paginated with links that keep both, a bad ``ordering`` ignored with a message;
and every list page (and the dashboard) at a fixed number of queries, for a superuser and
for a Reader of one vault."""
from __future__ import annotations

import re
from html import unescape

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from replication.models import ProtectedItem
from tests.conftest import grant_role
from tests.factories import VaultFactory
from tests.fleet import Fleet
from vault.models import Alert, Event

pytestmark = pytest.mark.django_db

# Every page with a table, and the orderings and filters it is asked for.
PAGES = [
    ("portal:overview", {}),
    ("portal:items", {}),
    ("portal:items", {"ordering": "-rpo_seconds"}),
    ("portal:items", {"ordering": "policy", "health": "WARNING"}),
    ("portal:jobs", {}),
    ("portal:jobs", {"ordering": "state", "target_name": "vm"}),
    ("portal:alerts", {}),
    ("portal:alerts", {"state": "", "ordering": "-severity"}),
    ("portal:events", {}),
    ("portal:events", {"ordering": "severity", "message": "happened"}),
    ("portal:machines", {}),
    ("portal:machines", {"ordering": "-last_seen_at", "protected": "true"}),
    ("portal:infrastructure", {}),
]


@pytest.fixture
def fleet(vault, admin_user):
    mine = Fleet(vault, user=admin_user)
    mine.other = Fleet(VaultFactory(name="zz-other-vault"), user=admin_user)  # another vault's rows never show
    mine.other.grow(3)
    return mine


def _shows_no_other_vault(fleet, html: str) -> None:
    for item in fleet.other.items:
        assert item.name not in html


def _signed_in(client, user, vault):
    client.force_login(user)
    assert client.get(reverse("portal:overview"), {"vault": vault.pk}).status_code == 200  # the session's vault
    return client


def _costs(client) -> dict[str, int]:
    costs = {}
    for name, params in PAGES:
        with CaptureQueriesContext(connection) as ctx:
            response = client.get(reverse(name), params)
        assert response.status_code == 200, (name, params, response.status_code)
        assert b"cannot be sorted" not in response.content, (name, params)
        costs[f"{name} {params}"] = len(ctx.captured_queries)
    return costs


@pytest.mark.parametrize("who", ["superuser", "reader"])
def test_every_list_page_uses_a_fixed_number_of_queries(client, fleet, admin_user, viewer_user, who):
    user = admin_user
    if who == "reader":
        grant_role(viewer_user, fleet.vault, "READER")
        user = viewer_user
    _signed_in(client, user, fleet.vault)
    fleet.grow(5)
    few = _costs(client)
    fleet.grow(50)
    many = _costs(client)
    grown = {page: (few[page], many[page]) for page in few if few[page] != many[page]}
    assert not grown, f"queries (5 rows, 55 rows) that grow with the rows: {grown}"


# --- sorting --------------------------------------------------------------------------------


def _names(response) -> list[str]:
    return re.findall(r'<td><a href="/items/[0-9a-f-]+/">([^<]+)</a></td>', response.content.decode())


def test_items_sort_by_a_clicked_column_both_ways(client, fleet, admin_user):
    _signed_in(client, admin_user, fleet.vault)
    fleet.grow(12)
    url = reverse("portal:items")
    items = list(ProtectedItem.objects.filter(vault=fleet.vault))
    assert any(i.rpo_seconds is None for i in items)
    largest_first = [i.name for i in sorted(items, key=lambda i: (i.rpo_seconds is None, -(i.rpo_seconds or 0), -i.pk.int))]
    smallest_first = [i.name for i in sorted(items, key=lambda i: (i.rpo_seconds is None, i.rpo_seconds or 0, i.pk.int))]
    page = client.get(url, {"ordering": "-rpo_seconds"})
    assert _names(page) == largest_first  # items without an RPO last, either way
    html = page.content.decode()
    # The RPO header now sorts the other way; the others start ascending, from the first page.
    assert '<th aria-sort="descending"><a class="sort" href="?ordering=rpo_seconds">RPO ▼</a></th>' in html
    assert '<a class="sort" href="?ordering=name">Name</a>' in html
    assert _names(client.get(url, {"ordering": "rpo_seconds"})) == smallest_first
    assert _names(client.get(url)) == sorted(i.name for i in items)  # by name unless asked


def test_health_and_severity_sort_by_gravity_not_alphabet(client, fleet, admin_user):
    _signed_in(client, admin_user, fleet.vault)
    fleet.grow(6)
    items = client.get(reverse("portal:items"), {"ordering": "-health"}).content.decode()
    found = [m for m in re.findall(r'class="badge health-(\w+)"', items)]
    assert found == sorted(found, key=["critical", "warning", "healthy"].index) and found[0] == "critical"
    alerts = client.get(reverse("portal:alerts"), {"ordering": "severity", "state": ""}).content.decode()
    severities = re.findall(r'<span class="badge sev-(\w+)">', alerts)
    assert severities == sorted(severities, key=["info", "warning", "critical"].index) and len(set(severities)) == 3


@pytest.mark.parametrize("name", ["portal:items", "portal:jobs", "portal:alerts", "portal:events", "portal:machines"])
@pytest.mark.parametrize("ordering", ["password", "-vault__passphrase_hash", "name; DROP TABLE x", "--name", "ñ" * 100])
def test_a_bad_ordering_is_ignored_with_a_message(client, fleet, admin_user, name, ordering):
    _signed_in(client, admin_user, fleet.vault)
    fleet.grow(3)
    plain = client.get(reverse(name))
    response = client.get(reverse(name), {"ordering": ordering})
    assert response.status_code == 200
    html = unescape(response.content.decode())
    assert "This table cannot be sorted by" in html and "It is sorted by" in html
    # The rows are those of the default order.
    rows = lambda r: re.findall(r"<tr[ >].*?</tr>", re.sub(r'<ul class="messages">.*?</ul>', "", r.content.decode(), flags=re.S), re.S)  # noqa: E731
    assert rows(response) == rows(plain)


def test_an_htmx_refresh_with_a_bad_ordering_adds_no_message(client, fleet, admin_user):
    _signed_in(client, admin_user, fleet.vault)
    fleet.grow(2)
    assert client.get(reverse("portal:jobs"), {"ordering": "nope"}, HTTP_HX_REQUEST="true").status_code == 200
    assert "cannot be sorted" not in client.get(reverse("portal:jobs")).content.decode()


# --- pagination and filters ------------------------------------------------------------------


def test_page_links_keep_the_filters_and_the_ordering(client, fleet, admin_user):
    _signed_in(client, admin_user, fleet.vault)
    fleet.grow(30)  # 60 events (each item's, and its alert's): two pages of 50
    assert Event.objects.filter(vault=fleet.vault).count() == 60
    url = reverse("portal:events")
    first = client.get(url, {"severity": "WARNING", "ordering": "-created_at"})
    assert Event.objects.filter(vault=fleet.vault, severity="WARNING").count() < 50
    assert 'class="pagination"' not in first.content.decode()  # one page
    everything = client.get(url, {"ordering": "kind"}).content.decode()
    assert "Page 1 of 2 (60 rows)" in everything
    assert 'href="?ordering=kind&amp;page=2" rel="next"' in everything
    second = client.get(url, {"ordering": "kind", "page": "2"}).content.decode()
    assert "Page 2 of 2 (60 rows)" in second and 'href="?ordering=kind&amp;page=1" rel="prev"' in second
    # A page number that is no number, or past the end, shows a page rather than an error.
    assert "Page 1 of 2" in client.get(url, {"page": "x"}).content.decode()
    assert "Page 2 of 2" in client.get(url, {"page": "99"}).content.decode()
    # Sorting by a column goes back to the first page and keeps the filters.
    filtered = client.get(url, {"message": "happened", "page": "2", "ordering": "kind"}).content.decode()
    assert 'href="?message=happened&amp;ordering=-kind"' in filtered


def test_the_items_filter_form_keeps_the_ordering(client, fleet, admin_user):
    _signed_in(client, admin_user, fleet.vault)
    fleet.grow(3)
    html = client.get(reverse("portal:items"), {"ordering": "-health"}).content.decode()
    assert '<input type="hidden" name="ordering" value="-health">' in html


def test_events_page_filters_by_severity_kind_and_text(client, fleet, admin_user):
    _signed_in(client, admin_user, fleet.vault)
    fleet.grow(6)
    url = reverse("portal:events")
    html = client.get(url, {"severity": "CRITICAL"}).content.decode()
    critical = Event.objects.filter(vault=fleet.vault, severity="CRITICAL").count()
    assert html.count('class="badge sev-critical"') == critical and 0 < critical < 12
    assert 'class="badge sev-info"' not in html and 'class="badge sev-warning"' not in html
    name = fleet.items[0].name
    only = client.get(url, {"message": f"to {name}"}).content.decode()
    assert only.count("Something happened to") == 1 and name in only and "RPO of" not in only
    assert "No events match these filters." in client.get(url, {"kind": "nothing-like-it"}).content.decode()
    _shows_no_other_vault(fleet, client.get(url).content.decode())


def test_alerts_page_filters_by_severity_acknowledgement_and_state(client, fleet, admin_user):
    _signed_in(client, admin_user, fleet.vault)
    fleet.grow(10)
    url = reverse("portal:alerts")
    mine = Alert.objects.filter(vault=fleet.vault)
    active = client.get(url).content.decode()  # active alerts by default
    assert active.count('<tr id="alert-') == mine.filter(state="ACTIVE").count() == 8
    every = client.get(url, {"state": ""}).content.decode()
    assert every.count('<tr id="alert-') == 10
    pending = client.get(url, {"state": "", "acknowledged": "false", "severity": "WARNING"}).content.decode()
    assert pending.count('<tr id="alert-') == mine.filter(acknowledged=False, severity="WARNING").count() >= 1


def test_machines_page_filters_sorts_and_links_the_protected_ones(client, fleet, admin_user):
    _signed_in(client, admin_user, fleet.vault)
    fleet.grow(4)  # 4 protected machines, 4 not
    url = reverse("portal:machines")
    html = client.get(url).content.decode()
    assert html.count("<tr><td>vm-") == 8
    protected = client.get(url, {"protected": "true"}).content.decode()
    assert protected.count("<tr><td>vm-") == 4 and protected.count(">protected</a>") == 4
    for item in fleet.items:
        assert f'href="/items/{item.pk}/">protected</a>' in protected
    assert client.get(url, {"protected": "false"}).content.decode().count("not protected") == 4
    off = client.get(url, {"power_state": "poweredOff"}).content.decode()
    assert "poweredOn" not in off and off.count("<tr><td>vm-") == 1
    names = re.findall(r"<tr><td>(vm-\d+)</td>", client.get(url, {"ordering": "-name"}).content.decode())
    assert names == sorted(names, reverse=True) and len(names) == 8
    # The infrastructure page links to them all.
    assert 'href="/infrastructure/machines/">All 8 machines</a>' in client.get(reverse("portal:infrastructure")).content.decode()


def test_a_reader_sees_only_their_vaults_rows(client, fleet, viewer_user):
    grant_role(viewer_user, fleet.vault, "READER")
    _signed_in(client, viewer_user, fleet.vault)
    fleet.grow(3)
    # Asking for the other vault changes nothing: the Reader holds no role on it.
    assert client.get(reverse("portal:overview"), {"vault": fleet.other.vault.pk}).status_code == 200
    for name in ("portal:overview", "portal:items", "portal:jobs", "portal:alerts", "portal:events", "portal:machines"):
        response = client.get(reverse(name), {"ordering": "-name"} if name in ("portal:items", "portal:machines") else {})
        assert response.status_code == 200
        _shows_no_other_vault(fleet, response.content.decode())
        if name == "portal:items":
            assert _names(response) == sorted((i.name for i in fleet.items), reverse=True)
