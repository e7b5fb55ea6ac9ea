"""Recovery in the portal through Django's test client: the item page's recovery buttons by
state, the recovered VM panels, the five recovery forms (good and bad input, a second click),
the network mapping and the recovery sites page, with query counts pinned on the lists."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from core.choices import JobType
from core.models import Job
from recovery_plans.models import RecoveredVm
from replication.choices import ProtectionState as P
from replication.choices import RecoveryPointType
from replication.choices import TestFailoverState as T
from replication.models import ProtectedItem, RecoveryPoint
from tests.conftest import grant_role
from tests.factories import (
    MachineFactory,
    PolicyFactory,
    ProcessServerFactory,
    ProtectedItemFactory,
    ReplicaDiskFactory,
)
from vault.models import RecoveryNetwork, RecoverySite, VCenter

pytestmark = pytest.mark.django_db

GiB = 1 << 30
OPERATIONS = {
    "test-failover": "Test failover",
    "test-failover-cleanup": "Cleanup test failover",
    "failover": "Failover",
    "apply-recovery-point": "Change recovery point",
    "commit": "Commit",
}


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture
def viewer_client(client, viewer_user, vault):
    grant_role(viewer_user, vault, "READER")
    client.force_login(viewer_user)
    return client


def _recovery_site(vault, name="recovery-site", *, host="/var/lib/lifeboat/recovery-site", networks=None):
    site = RecoverySite.objects.create(vault=vault, name=name, kind="simulated", host=host)
    for net, purpose in networks or [("recovery-net", "RECOVERY"), ("test-net", "TEST"), ("dmz-net", "RECOVERY"),
                                     ("lab-net", "TEST")]:
        RecoveryNetwork.objects.create(site=site, name=net, purpose=purpose)
    return site


@pytest.fixture
def item(vault):
    """A protected item of a vCenter VM with two disks and points, mapped to a recovery site."""
    policy = PolicyFactory(vault=vault, name="gold")
    server = ProcessServerFactory(vault=vault, name="ps-east")
    vcenter = VCenter.objects.create(vault=vault, name="vc-east", host="vc-east.example.com", username="root",
                                     password_encrypted="x")
    machine = MachineFactory(vault=vault, vcenter=vcenter, name="db-01", source="vcenter")
    site = _recovery_site(vault)
    item = ProtectedItemFactory(
        vault=vault, machine=machine, policy=policy, process_server=server,
        recovery_site=site, recovery_network=site.networks.get(name="recovery-net"),
        test_network=site.networks.get(name="test-net"),
    )
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=P.PROTECTED)
    ReplicaDiskFactory(item=item, index=0, label="Hard disk 1", capacity_bytes=2 * GiB)
    ReplicaDiskFactory(item=item, index=1, label="Hard disk 2", capacity_bytes=GiB)
    now = timezone.now()
    for k in range(4):
        RecoveryPoint.objects.create(
            item=item, point_id=f"p{k}", seq=k + 1, time=now - timedelta(minutes=5 * (4 - k)),
            type=RecoveryPointType.APP_CONSISTENT if k == 1 else RecoveryPointType.CRASH_CONSISTENT,
        )
    item.refresh_from_db()
    return item


def _set_state(item, protection=P.PROTECTED, test=T.NONE):
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=protection, test_failover_state=test)
    item.refresh_from_db()


def _recovered(item, kind, *, name, network, point_type=RecoveryPointType.APP_CONSISTENT, removed=False):
    point = item.recovery_points.get(point_id="p1")
    return RecoveredVm.objects.create(
        item=item, kind=kind, site=item.recovery_site, network=network, vm_id=f"vm-{name}", name=name,
        power_state="poweredOn", point_id=point.point_id, point_time=point.time, point_type=point_type,
        disks=[{"index": 0, "size_bytes": 2 * GiB, "digest": "blake3:aa", "method": "clone", "location": "/x/0.img"},
               {"index": 1, "size_bytes": GiB, "digest": "blake3:bb", "method": "clone", "location": "/x/1.img"}],
        verified_bytes=3 * GiB, removed_at=timezone.now() if removed else None,
        cleanup_notes="drill went fine" if removed else "",
    )


def _item_page(client, item) -> str:
    response = client.get(reverse("portal:item-detail", args=[item.pk]))
    assert response.status_code == 200
    return response.content.decode()


def _buttons(html: str, item) -> set[str]:
    return {op for op in OPERATIONS if reverse("portal:item-recovery", args=[item.pk, op]) in html}


# --- the item page -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protection", "test", "expected"),
    [
        (P.PROTECTED, T.NONE, {"test-failover", "failover"}),
        (P.PROTECTED, T.IN_PROGRESS, {"failover"}),
        (P.PROTECTED, T.SUCCEEDED, {"test-failover-cleanup", "failover"}),
        (P.PROTECTED, T.CLEANING_UP, {"failover"}),
        (P.INITIAL_REPLICATION, T.NONE, set()),
        (P.ENABLING, T.NONE, set()),
        (P.RESYNCING, T.SUCCEEDED, {"test-failover-cleanup"}),
        (P.RESYNC_REQUIRED, T.NONE, {"test-failover"}),  # a drill runs while replication catches up
        (P.RESYNCING, T.NONE, {"test-failover"}),
        (P.FAILOVER_IN_PROGRESS, T.NONE, set()),
        (P.FAILED_OVER, T.NONE, {"apply-recovery-point", "commit"}),
        (P.FAILED_OVER, T.SUCCEEDED, {"apply-recovery-point", "commit", "test-failover-cleanup"}),
        (P.FAILOVER_COMMITTED, T.NONE, set()),
        (P.DISABLING, T.NONE, set()),
    ],
)
def test_item_page_offers_the_recovery_buttons_its_state_allows(admin_client, item, protection, test, expected):
    _set_state(item, protection, test)
    html = _item_page(admin_client, item)
    assert _buttons(html, item) == expected
    for op in expected:
        assert f">{OPERATIONS[op]}</a>" in html


def test_viewer_sees_no_recovery_buttons(viewer_client, item):
    html = _item_page(viewer_client, item)
    assert _buttons(html, item) == set()
    assert "Network mapping" not in html
    assert "recovery-site" in html  # the mapping itself is shown


def test_item_page_shows_the_recovered_vms(admin_client, item):
    _set_state(item, P.FAILED_OVER, T.SUCCEEDED)
    test_net, rec_net = item.test_network, item.recovery_network
    _recovered(item, "TEST", name="db-01-test", network=test_net)
    failover = _recovered(item, "FAILOVER", name="db-01", network=rec_net, point_type=RecoveryPointType.CRASH_CONSISTENT)
    RecoveredVm.objects.filter(pk=failover.pk).update(power_state="poweredOff")
    _recovered(item, "TEST", name="db-01-old-drill", network=test_net, removed=True)
    html = _item_page(admin_client, item)
    for text in ("Test VM", "db-01-test", "test-net", "Failed-over VM", "recovery-net", "recovery-site",
                 "2 disks verified, 3.0\xa0GB", "App-consistent", "Crash-consistent", "Running", "poweredOff",
                 "blake3:aa", "blake3:bb", "clone"):
        assert text in html, text
    assert "db-01-old-drill" not in html  # a removed test VM is not current

    # The live status partial carries the panels too, so they change without a reload.
    partial = admin_client.get(reverse("portal:item-detail", args=[item.pk]), HTTP_HX_REQUEST="true").content.decode()
    assert partial.lstrip().startswith('<div id="item-status"')
    assert "db-01-test" in partial and "2 disks verified" in partial


def test_item_page_without_a_recovery_site_says_so(admin_client, vault):
    item = ProtectedItemFactory(vault=vault)
    _set_state(item)
    html = _item_page(admin_client, item)
    assert "Map this item to a recovery site" in html
    assert "Network mapping" not in html  # the vault has no recovery site to map to


# --- the forms: rendering ------------------------------------------------------------------


def _form_url(item, op):
    return reverse("portal:item-recovery", args=[item.pk, op])


@pytest.mark.parametrize(
    ("op", "protection", "test", "texts"),
    [
        ("test-failover", P.PROTECTED, T.NONE,
         ["Test failover: db-01", "Latest processed", "Latest app-consistent", "App-consistent", "Crash-consistent",
          'name="network"', "test-net", "lab-net", "Start a test failover of db-01"]),
        ("test-failover-cleanup", P.PROTECTED, T.SUCCEEDED, ["Cleanup test failover: db-01", 'name="notes"']),
        ("failover", P.PROTECTED, T.NONE,
         ["Failover: db-01", 'value="planned"', 'value="unplanned"', 'name="shut_down_source"', "recovery-net", "dmz-net",
          "Type the VM&#x27;s name, db-01, to fail it over"]),
        ("apply-recovery-point", P.FAILED_OVER, T.NONE, ["Change recovery point: db-01", "App-consistent"]),
        ("commit", P.FAILED_OVER, T.NONE, ["Commit failover: db-01", "Type the VM&#x27;s name, db-01"]),
    ],
)
def test_recovery_forms_render(admin_client, item, op, protection, test, texts):
    _set_state(item, protection, test)
    response = admin_client.get(_form_url(item, op))
    assert response.status_code == 200
    html = response.content.decode()
    for text in texts:
        assert text in html, text


def test_test_failover_form_lists_every_point_with_type_and_time_and_defaults_to_the_mapping(admin_client, item):
    form = admin_client.get(_form_url(item, "test-failover")).context["form"]
    groups = dict(form.fields["point"].choices)
    assert [v for v, _ in groups["Newest"]] == ["latest", "latest_processed", "latest_app_consistent"]
    specific = groups["A specific recovery point (newest first)"]
    points = list(item.recovery_points.order_by("-time"))
    assert [v for v, _ in specific] == [str(p.pk) for p in points]
    assert specific[2][1] == f"{points[2].time:%Y-%m-%d %H:%M:%S %Z} · App-consistent"
    # Only the site's test networks, the mapped one first chosen.
    assert [n.name for n in form.fields["network"].queryset] == ["lab-net", "test-net"]
    assert form["network"].value() == item.test_network_id


def test_form_for_an_operation_the_state_does_not_allow_goes_back_to_the_item(admin_client, item):
    for op in ("test-failover-cleanup", "apply-recovery-point", "commit"):
        response = admin_client.get(_form_url(item, op), follow=True)
        assert response.redirect_chain[-1][0] == reverse("portal:item-detail", args=[item.pk])
        assert "is not possible now: db-01 is protected, test failover: none." in response.content.decode()
    assert admin_client.get(_form_url(item, "reprotect")).status_code == 404


# --- the forms: submitting -----------------------------------------------------------------


def _snapshot(item):
    item = ProtectedItem.objects.get(pk=item.pk)
    return (item.protection_state, item.test_failover_state, Job.objects.count(), RecoveredVm.objects.count())


def test_test_failover_starts_a_job_and_a_second_click_gets_the_409_sentence(admin_client, item):
    point = item.recovery_points.get(point_id="p2")
    lab = item.recovery_site.networks.get(name="lab-net")
    data = {"point": str(point.pk), "network": lab.pk, "confirm": "on"}
    response = admin_client.post(_form_url(item, "test-failover"), data)
    job = Job.objects.get(type=JobType.TEST_FAILOVER)
    assert response.status_code == 302 and response["Location"] == reverse("portal:job-detail", args=[job.pk])
    assert job.params["point_id"] == "p2" and job.params["network_id"] == lab.pk
    item.refresh_from_db()
    assert item.test_failover_state == T.IN_PROGRESS

    before = _snapshot(item)
    again = admin_client.post(_form_url(item, "test-failover"), data)
    assert again.status_code == 409
    html = again.content.decode()
    assert "Cannot test failover &#x27;db-01&#x27; now: test failover in progress." in html
    assert "Traceback" not in html
    assert _snapshot(item) == before


def test_failover_planned_and_unplanned(admin_client, item):
    data = {"kind": "planned", "point": "latest", "network": item.recovery_network_id, "confirm_name": "db-01"}
    response = admin_client.post(_form_url(item, "failover"), data)
    assert response.status_code == 302
    job = Job.objects.get()
    assert job.type == JobType.PLANNED_FAILOVER and job.params["shut_down_source"] is True
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.FAILOVER_IN_PROGRESS

    again = admin_client.post(_form_url(item, "failover"), data)
    assert again.status_code == 409
    assert "Cannot fail over &#x27;db-01&#x27; while it is failover in progress." in again.content.decode()

    _set_state(item, P.PROTECTED)
    dmz = item.recovery_site.networks.get(name="dmz-net")
    response = admin_client.post(_form_url(item, "failover"), {
        "kind": "unplanned", "point": "latest_app_consistent", "network": dmz.pk, "confirm_name": "db-01",
    })
    assert response.status_code == 302
    job = Job.objects.get(type=JobType.UNPLANNED_FAILOVER)
    assert job.params["point_id"] == "p1" and job.params["network_id"] == dmz.pk
    assert job.params["shut_down_source"] is False  # the box was not ticked


def test_cleanup_records_the_notes(admin_client, item):
    _set_state(item, P.PROTECTED, T.SUCCEEDED)
    response = admin_client.post(_form_url(item, "test-failover-cleanup"), {"notes": "Booted, app answered.", "confirm": "on"})
    assert response.status_code == 302
    job = Job.objects.get(type=JobType.TEST_FAILOVER_CLEANUP)
    assert job.params["notes"] == "Booted, app answered."
    assert ProtectedItem.objects.get(pk=item.pk).test_failover_state == T.CLEANING_UP


def test_change_point_and_commit(admin_client, item):
    _set_state(item, P.FAILED_OVER)
    _recovered(item, "FAILOVER", name="db-01", network=item.recovery_network)
    point = item.recovery_points.get(point_id="p0")
    response = admin_client.post(_form_url(item, "apply-recovery-point"), {"point": str(point.pk), "confirm": "on"})
    assert response.status_code == 302
    assert Job.objects.get(type=JobType.APPLY_RECOVERY_POINT).params["point_id"] == "p0"
    # While it runs, commit waits: the 409 sentence, nothing changes.
    before = _snapshot(item)
    response = admin_client.post(_form_url(item, "commit"), {"confirm_name": "db-01"})
    assert response.status_code == 409
    assert "while change recovery point is running" in response.content.decode()
    assert _snapshot(item) == before

    Job.objects.filter(type=JobType.APPLY_RECOVERY_POINT).update(state="SUCCEEDED", ended_at=timezone.now())
    response = admin_client.post(_form_url(item, "commit"), {"confirm_name": "db-01"})
    assert response.status_code == 302
    assert ProtectedItem.objects.get(pk=item.pk).protection_state == P.FAILOVER_COMMITTED


@pytest.mark.parametrize(
    ("op", "protection", "test", "data", "message"),
    [
        ("test-failover", P.PROTECTED, T.NONE, {"point": "latest"}, "This field is required."),  # no confirmation
        ("test-failover", P.PROTECTED, T.NONE, {"point": "yesterday", "confirm": "on"},
         "Select a valid choice. yesterday is not one of the available choices."),
        ("test-failover", P.PROTECTED, T.NONE, {"point": "latest", "network": "recovery-net", "confirm": "on"},
         "Select a valid choice. That choice is not one of the available choices."),
        ("failover", P.PROTECTED, T.NONE, {"kind": "planned", "point": "latest", "confirm_name": "db-02"},
         "That is not the VM&#x27;s name. Type db-01 exactly."),
        ("failover", P.PROTECTED, T.NONE, {"kind": "sideways", "point": "latest", "confirm_name": "db-01"},
         "Select a valid choice. sideways is not one of the available choices."),
        ("failover", P.PROTECTED, T.NONE, {"kind": "unplanned", "point": "latest", "confirm_name": ""},
         "This field is required."),
        ("test-failover-cleanup", P.PROTECTED, T.SUCCEEDED, {"notes": "x" * 4001, "confirm": "on"},
         "Ensure this value has at most 4000 characters"),
        ("apply-recovery-point", P.FAILED_OVER, T.NONE, {"point": "latest"}, "This field is required."),
        ("commit", P.FAILED_OVER, T.NONE, {"confirm_name": "DB-01"}, "That is not the VM&#x27;s name. Type db-01 exactly."),
    ],
)
def test_recovery_forms_bad_input_says_why_and_changes_nothing(admin_client, item, op, protection, test, data, message):
    _set_state(item, protection, test)
    if protection == P.FAILED_OVER:
        _recovered(item, "FAILOVER", name="db-01", network=item.recovery_network)
    data = {"network": (item.test_network_id if op == "test-failover" else item.recovery_network_id), **data}
    if data["network"] == "recovery-net":
        data["network"] = item.recovery_network_id  # a recovery network offered for a drill
    before = _snapshot(item)
    response = admin_client.post(_form_url(item, op), data)
    assert response.status_code == 200
    html = response.content.decode()
    assert message in html
    assert 'class="error"' in html
    assert _snapshot(item) == before


def test_domain_errors_of_the_service_show_as_form_errors(admin_client, item):
    # No app-consistent point: the service's sentence, on the form.
    item.recovery_points.filter(type=RecoveryPointType.APP_CONSISTENT).update(type=RecoveryPointType.CRASH_CONSISTENT)
    before = _snapshot(item)
    response = admin_client.post(_form_url(item, "test-failover"), {
        "point": "latest_app_consistent", "network": item.test_network_id, "confirm": "on",
    })
    assert response.status_code == 200
    assert "has no app-consistent recovery point yet" in response.content.decode()
    assert _snapshot(item) == before


def test_recovery_without_a_recovery_site_says_what_is_missing(admin_client, item):
    ProtectedItem.objects.filter(pk=item.pk).update(recovery_site=None, recovery_network=None, test_network=None)
    before = _snapshot(item)
    response = admin_client.post(_form_url(item, "test-failover"), {"point": "latest", "confirm": "on"})
    assert response.status_code == 200
    assert "has no recovery site. Choose one for it" in response.content.decode()
    assert _snapshot(item) == before


def test_viewer_cannot_recover(viewer_client, item):
    before = _snapshot(item)
    assert viewer_client.get(_form_url(item, "test-failover")).status_code == 403
    response = viewer_client.post(_form_url(item, "test-failover"), {
        "point": "latest", "network": item.test_network_id, "confirm": "on",
    })
    assert response.status_code == 403
    assert _snapshot(item) == before


# --- network mapping -----------------------------------------------------------------------


def test_admin_changes_the_network_mapping(admin_client, item):
    site = item.recovery_site
    url = reverse("portal:item-network-mapping", args=[item.pk])
    lab, dmz = site.networks.get(name="lab-net"), site.networks.get(name="dmz-net")
    response = admin_client.post(url, {"recovery_site": site.pk, "recovery_network": dmz.pk, "test_network": lab.pk}, follow=True)
    assert "Network mapping saved." in response.content.decode()
    item.refresh_from_db()
    assert (item.recovery_network, item.test_network) == (dmz, lab)


@pytest.mark.parametrize("bad", ["test-as-recovery", "other-site", "no-site"])
def test_bad_network_mapping_says_why_and_changes_nothing(admin_client, vault, item, bad):
    other = _recovery_site(vault, "other-site", host="/srv/other", networks=[("far-net", "RECOVERY"), ("far-test", "TEST")])
    site = item.recovery_site
    data = {"recovery_site": site.pk, "recovery_network": item.recovery_network_id, "test_network": item.test_network_id}
    if bad == "test-as-recovery":
        data["recovery_network"] = item.test_network_id
    elif bad == "other-site":
        data["test_network"] = other.networks.get(name="far-test").pk
    else:
        data["recovery_site"] = ""
    response = admin_client.post(reverse("portal:item-network-mapping", args=[item.pk]), data, follow=True)
    html = response.content.decode()
    assert "msg-error" in html and "Network mapping saved." not in html
    fresh = ProtectedItem.objects.get(pk=item.pk)
    assert (fresh.recovery_site_id, fresh.recovery_network_id, fresh.test_network_id) == (
        item.recovery_site_id, item.recovery_network_id, item.test_network_id)


def test_viewer_cannot_change_the_network_mapping(viewer_client, item):
    lab = item.recovery_site.networks.get(name="lab-net")
    response = viewer_client.post(reverse("portal:item-network-mapping", args=[item.pk]),
                                  {"recovery_site": item.recovery_site_id, "test_network": lab.pk})
    assert response.status_code == 403
    assert ProtectedItem.objects.get(pk=item.pk).test_network_id == item.test_network_id


# --- recovery sites ------------------------------------------------------------------------


def _site_form(**overrides) -> dict:
    data = {"name": "dr-east", "kind": "simulated", "host": "/srv/lifeboat/dr-east", "port": 443,
            "recovery_networks": "prod-net, backup-net", "test_networks": "bubble-net"}
    data.update(overrides)
    return data


def test_recovery_sites_page_lists_and_adds(admin_client, item, vault):
    url = reverse("portal:recovery-sites")
    html = admin_client.get(url).content.decode()
    for text in ("recovery-site", "Simulated recovery site", "recovery-net", "test-net", "Add a recovery site"):
        assert text in html, text
    response = admin_client.post(reverse("portal:recovery-site-add"), _site_form())
    assert response.status_code == 302 and response["Location"] == url
    site = RecoverySite.objects.get(vault=vault, name="dr-east")
    assert sorted(site.networks.values_list("name", "purpose")) == [
        ("backup-net", "RECOVERY"), ("bubble-net", "TEST"), ("prod-net", "RECOVERY")]
    assert "Recovery site dr-east added." in admin_client.get(url).content.decode()
    # The infrastructure page lists it too.
    infra = admin_client.get(reverse("portal:infrastructure")).content.decode()
    assert "dr-east" in infra and "bubble-net" in infra


def test_add_a_vsphere_recovery_site(admin_client, vault):
    response = admin_client.post(reverse("portal:recovery-site-add"), _site_form(
        name="dr-vc", kind="vsphere", host="vc-dr.example.com", username="administrator@vsphere.local",
        password="s3cret-pass", allow_untrusted="on", datacenter="DC0", datastore="LocalDS_0", placement="DC0_C0",
        recovery_networks="VM Network", test_networks="DVS0-DVUplinks",
    ))
    assert response.status_code == 302
    site = RecoverySite.objects.get(vault=vault, name="dr-vc")
    assert (site.kind, site.datastore, site.placement, site.allow_untrusted) == ("vsphere", "LocalDS_0", "DC0_C0", True)
    assert "s3cret-pass" not in site.password_encrypted


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"test_networks": ""}, "This field is required."),
        ({"recovery_networks": " , "}, "This field is required."),
        ({"host": "relative/dir"}, "must be an absolute path"),
        ({"kind": "vsphere", "host": "vc.example.com", "username": "root", "password": "pw-123456",
          "datacenter": "DC0", "placement": "DC0_C0"}, "A vSphere recovery site needs the datastore."),
        ({"name": "recovery-site"}, "already"),
        ({"kind": "tape"}, "Select a valid choice."),
    ],
)
def test_bad_recovery_site_says_why_and_adds_nothing(admin_client, item, vault, overrides, message):
    before = (RecoverySite.objects.count(), RecoveryNetwork.objects.count())
    response = admin_client.post(reverse("portal:recovery-site-add"), _site_form(**overrides))
    assert response.status_code == 200
    html = response.content.decode()
    assert message in html, html[html.find('class="error"') - 200:][:800]
    assert (RecoverySite.objects.count(), RecoveryNetwork.objects.count()) == before


def test_viewer_cannot_add_a_recovery_site(viewer_client, vault):
    page = viewer_client.get(reverse("portal:recovery-sites")).content.decode()
    assert "Add a recovery site" not in page
    assert viewer_client.post(reverse("portal:recovery-site-add"), _site_form()).status_code == 403
    assert not RecoverySite.objects.exists()


# --- query counts --------------------------------------------------------------------------


def _queries(client, url) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries)


def test_recovery_sites_page_uses_a_fixed_number_of_queries(admin_client, vault):
    url = reverse("portal:recovery-sites")
    _recovery_site(vault, "site-0", host="/srv/s0")
    admin_client.get(url)
    few = _queries(admin_client, url)
    for n in range(1, 12):
        _recovery_site(vault, f"site-{n}", host=f"/srv/s{n}")
    assert _queries(admin_client, url) == few


def test_item_page_and_recovery_form_use_a_fixed_number_of_queries(admin_client, item):
    _set_state(item, P.FAILED_OVER, T.SUCCEEDED)
    _recovered(item, "TEST", name="db-01-test", network=item.test_network)
    _recovered(item, "FAILOVER", name="db-01", network=item.recovery_network)
    urls = [reverse("portal:item-detail", args=[item.pk]), _form_url(item, "apply-recovery-point")]
    admin_client.get(urls[0])
    few = [_queries(admin_client, u) for u in urls]
    now = timezone.now()
    for k in range(30):
        RecoveryPoint.objects.create(item=item, point_id=f"q{k}", seq=100 + k, time=now - timedelta(seconds=k),
                                     type=RecoveryPointType.CRASH_CONSISTENT)
        _recovered(item, "TEST", name=f"old-drill-{k}", network=item.test_network, removed=True)
    _recovery_site(item.vault, "another", host="/srv/another")
    assert [_queries(admin_client, u) for u in urls] == few
