"""Alert e-mail through a real SMTP server: one mail when a problem starts, one when it has
stayed resolved for the quiet period, never one per sweep.

The SMTP server is aiosmtpd on a free 127.0.0.1 port, and Django's SMTP backend delivers to it.
Sweeps run the monitor task's three steps with an explicit ``now``; one test runs the
``replication.monitor`` task itself on the real worker.
"""
from __future__ import annotations

import email
import email.policy
import itertools
import socket
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import getaddresses

import pytest
from aiosmtpd.controller import Controller
from django.utils import timezone

from core.choices import JobState
from core.jobs import job_execute
from replication.choices import ProtectionState as P
from replication.dataplane.apply import RecoveryPoint as PlanePoint
from replication.engine import points_mirror
from replication.models import ProtectedItem
from replication.monitoring import items_monitor, process_servers_monitor
from tests.conftest import wait_for
from tests.factories import MachineFactory, PolicyFactory, ProtectedItemFactory, VaultFactory
from vault.choices import AlertState, VCenterKind
from vault.connectors.simulated import SimulatedSite
from vault.discovery import vcenter_discover
from vault.models import Alert, ProcessServer
from vault.notifications import alerts_notify
from vault.services import vcenter_create

API = "/api/v1"
QUIET = 300  # seconds an alert must stay resolved before its "ended" mail
RECIPIENTS = ["ops@example.com", "dr-team@example.com"]
_seq = itertools.count(1)


# --- a real SMTP server ------------------------------------------------------------------


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return self.message["Subject"]

    @property
    def to(self) -> list[str]:
        return [address for _, address in getaddresses([self.message["To"]])]

    @property
    def body(self) -> str:
        return self.message.get_body(preferencelist=("plain",)).get_content()


class Mailbox:
    """aiosmtpd handler: keeps every message the server accepts."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SmtpServer:
    """Starts and stops aiosmtpd servers, and points Django's SMTP backend at the running one."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.controller: Controller | None = None
        self.mailbox = Mailbox()

    def start(self) -> Mailbox:
        self.mailbox = Mailbox()
        port = _free_port()
        self.controller = Controller(self.mailbox, hostname="127.0.0.1", port=port)
        self.controller.start()
        self.settings.EMAIL_PORT = port
        return self.mailbox

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def mails(self) -> list[Mail]:
        return self.mailbox.mails


@pytest.fixture
def smtp(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
    settings.EMAIL_TIMEOUT = 5
    settings.DEFAULT_FROM_EMAIL = "lifeboat@dr.example.com"
    settings.LIFEBOAT_ALERT_QUIET_SECONDS = QUIET
    settings.LIFEBOAT_HEARTBEAT_TIMEOUT = 900
    server = SmtpServer(settings)
    server.start()
    yield server
    server.stop()


# --- Lifeboat side -----------------------------------------------------------------------


@pytest.fixture
def t0():
    return timezone.now().replace(microsecond=0)


def breaching_vault(*, name: str, threshold_minutes: int = 15, **vault_fields):
    vault = VaultFactory(name=name, **vault_fields)
    policy = PolicyFactory(vault=vault, rpo_threshold_minutes=threshold_minutes)
    item = ProtectedItemFactory(vault=vault, policy=policy, machine=MachineFactory(vault=vault, name=f"{name}-web-01"),
                                protection_state=P.PROTECTED)
    return vault, item


def set_point(item: ProtectedItem, at) -> None:
    """The data plane reports one recovery point, whose source time is ``at``."""
    points_mirror(item=item, points=[PlanePoint(point_id=f"p{next(_seq)}", seq=next(_seq), source_time_ns=int(at.timestamp() * 1e9),
                                                kind="crash_consistent", label=None, snapshots={})])


def sweep(now) -> dict:
    """What the monitor task does, at ``now``: every agent and process server has just reported."""
    ProtectedItem.objects.update(agent_last_heartbeat_at=now)
    ProcessServer.objects.update(last_heartbeat_at=now)
    items_monitor(now=now)
    process_servers_monitor(now=now)
    return alerts_notify(now=now)


def starts(mails: list[Mail]) -> list[Mail]:
    return [m for m in mails if "Resolved:" not in m.subject]


def ends(mails: list[Mail]) -> list[Mail]:
    return [m for m in mails if "Resolved:" in m.subject]


# --- one mail when a problem starts, one when it has ended -------------------------------


@pytest.mark.django_db
def test_rpo_breach_mails_the_vaults_recipients_once(smtp, t0):
    vault, item = breaching_vault(name="north", alert_emails=RECIPIENTS)
    set_point(item, t0 - timedelta(minutes=20))

    sent = sweep(t0)

    assert sent == {"started": 1, "ended": 0, "failed": 0}
    (mail,) = smtp.mails
    assert sorted(mail.rcpt_tos) == sorted(RECIPIENTS)
    assert sorted(mail.to) == sorted(RECIPIENTS)
    assert mail.mail_from == "lifeboat@dr.example.com"
    assert mail.subject == "[Lifeboat north] Warning: RPO of north-web-01 is 20 min, above its threshold of 15 min."
    assert "RPO of north-web-01 is 20 min" in mail.body
    assert f"/items/{item.pk}/" in mail.body
    assert "one more e-mail when it ends" in mail.body

    # The breach goes on (RPO grows, still under twice the threshold): no more mail.
    for minute in range(1, 9):
        assert sweep(t0 + timedelta(minutes=minute)) == {"started": 0, "ended": 0, "failed": 0}
    assert len(smtp.mails) == 1
    alert = Alert.objects.get(key=f"rpo:{item.pk}")
    assert alert.state == AlertState.ACTIVE and alert.emailed_start_at is not None and alert.emailed_end_at is None


@pytest.mark.django_db
def test_recovery_resolves_at_once_and_mails_after_the_quiet_period(smtp, api, t0):
    vault, item = breaching_vault(name="south", alert_emails=RECIPIENTS)
    set_point(item, t0 - timedelta(minutes=20))
    sweep(t0)
    alert = Alert.objects.get(key=f"rpo:{item.pk}")
    assert len(smtp.mails) == 1

    recovered = t0 + timedelta(minutes=2)
    set_point(item, recovered - timedelta(seconds=30))
    sweep(recovered)

    # Resolved in the portal and the API at once...
    shown = api.get(f"{API}/replicationAlerts/{alert.pk}/").json()
    assert shown["state"] == AlertState.RESOLVED
    assert api.get(f"{API}/replicationProtectedItems/{item.pk}/").json()["health"] == "HEALTHY"
    # ...but the mail waits for the quiet period.
    assert len(smtp.mails) == 1
    assert sweep(recovered + timedelta(seconds=QUIET - 1))["ended"] == 0
    assert len(smtp.mails) == 1

    assert sweep(recovered + timedelta(seconds=QUIET)) == {"started": 0, "ended": 1, "failed": 0}
    assert len(smtp.mails) == 2
    end = smtp.mails[1]
    assert end.subject == "[Lifeboat south] Resolved: RPO of south-web-01 is 20 min, above its threshold of 15 min."
    assert sorted(end.rcpt_tos) == sorted(RECIPIENTS)
    assert "has ended" in end.body and "south-web-01" in end.body

    for minute in range(1, 4):
        sweep(recovered + timedelta(seconds=QUIET, minutes=minute))
    assert len(smtp.mails) == 2


@pytest.mark.django_db
def test_flapping_rpo_is_one_start_and_one_end_mail(smtp, t0):
    vault, item = breaching_vault(name="east", threshold_minutes=1, alert_emails=RECIPIENTS)
    key = f"rpo:{item.pk}"
    sweeps = 0
    # Four cycles of two minutes: a recovery point at the start of each, sweeps every 20 s;
    # RPO passes the 1-minute threshold at 80 s and is back to 0 at the next cycle.
    for cycle in range(4):
        start = t0 + timedelta(seconds=120 * cycle)
        set_point(item, start)
        for offset in range(0, 120, 20):
            sweep(start + timedelta(seconds=offset))
            sweeps += 1
        assert Alert.objects.get(key=key).state == AlertState.ACTIVE  # breached at 80 s and 100 s
    last_recovery = t0 + timedelta(seconds=480)
    set_point(item, last_recovery)
    sweep(last_recovery)

    assert sweeps == 24
    assert Alert.objects.filter(key=key).count() == 1
    assert Alert.objects.get(key=key).state == AlertState.RESOLVED
    assert len(starts(smtp.mails)) == 1 and ends(smtp.mails) == []

    # RPO stays low; the "ended" mail goes out once the alert has stayed resolved for QUIET.
    now = last_recovery
    while now < last_recovery + timedelta(seconds=QUIET + 120):
        now += timedelta(seconds=20)
        set_point(item, now - timedelta(seconds=5))
        sweep(now)
        expected_ends = 1 if now >= last_recovery + timedelta(seconds=QUIET) else 0
        assert len(ends(smtp.mails)) == expected_ends, now - last_recovery
    assert len(smtp.mails) == 2
    assert Alert.objects.get(key=key).emailed_end_at is not None

    # After the "ended" mail, a new breach is a new problem: a new alert and a new mail.
    set_point(item, now - timedelta(seconds=5))
    sweep(now + timedelta(seconds=90))  # RPO 95 s: above the threshold, not twice it
    assert Alert.objects.filter(key=key).count() == 2
    assert len(starts(smtp.mails)) == 2 and len(ends(smtp.mails)) == 1


@pytest.mark.django_db
def test_failed_job_raises_an_alert_and_mails_it(smtp, tmp_path, t0):
    vault = VaultFactory(name="west", alert_emails=["ops@example.com"])
    SimulatedSite.create(tmp_path / "site", user="administrator@vsphere.local", password="right-Pa55word", vms=["web-01"])
    vcenter = vcenter_create(vault=vault, name="lab", kind=VCenterKind.SIMULATED, host=str(tmp_path / "site"),
                             username="administrator@vsphere.local", password="wrong-Pa55word")
    job = vcenter_discover(vcenter=vcenter)
    job_execute(job_id=str(job.pk))  # the job engine, in this process
    job.refresh_from_db()
    assert job.state == JobState.FAILED

    (alert,) = Alert.objects.filter(vault=vault)
    assert (alert.kind, alert.job_id, alert.state) == ("job_failed", job.pk, AlertState.ACTIVE)

    assert sweep(t0)["started"] == 1
    (mail,) = smtp.mails
    assert mail.to == ["ops@example.com"]
    assert mail.subject.startswith("[Lifeboat west] Warning: Discover vCenter of lab failed:")
    assert "rejected the user name or password" in mail.body
    assert f"/jobs/{job.pk}/" in mail.body
    assert "Pa55word" not in mail.message.as_string()

    sweep(t0 + timedelta(minutes=1))
    assert len(smtp.mails) == 1


@pytest.mark.django_db
def test_no_mail_for_vaults_with_alert_mail_off_or_no_recipients(smtp, t0):
    _, muted = breaching_vault(name="muted", alert_emails=["muted@example.com"], email_alerts_enabled=False)
    _, nobody = breaching_vault(name="nobody", alert_emails=[])
    _, loud = breaching_vault(name="loud", alert_emails=["loud@example.com"])
    for item in (muted, nobody, loud):
        set_point(item, t0 - timedelta(minutes=20))

    sweep(t0)
    sweep(t0 + timedelta(minutes=1))

    # Every vault shows its alert; only the vault that wants mail gets it.
    assert Alert.objects.filter(kind="rpo_exceeded", state=AlertState.ACTIVE).count() == 3
    assert [m.rcpt_tos for m in smtp.mails] == [["loud@example.com"]]

    recovered = t0 + timedelta(minutes=2)
    for item in (muted, nobody, loud):
        set_point(item, recovered)
    sweep(recovered)
    sweep(recovered + timedelta(seconds=QUIET))
    sweep(recovered + timedelta(seconds=QUIET + 60))

    assert Alert.objects.filter(kind="rpo_exceeded", state=AlertState.RESOLVED).count() == 3
    assert [m.rcpt_tos for m in smtp.mails] == [["loud@example.com"], ["loud@example.com"]]
    assert "Resolved:" in smtp.mails[1].subject and "loud-web-01" in smtp.mails[1].subject


@pytest.mark.django_db
def test_mail_server_down_is_retried_by_a_later_sweep(smtp, t0, caplog):
    vault, item = breaching_vault(name="central", alert_emails=["ops@example.com"])
    set_point(item, t0 - timedelta(minutes=20))
    smtp.stop()

    # Nothing listens on the port: the sweep goes on, the mail stays due.
    assert sweep(t0) == {"started": 0, "ended": 0, "failed": 1}
    assert sweep(t0 + timedelta(minutes=1)) == {"started": 0, "ended": 0, "failed": 1}
    alert = Alert.objects.get(key=f"rpo:{item.pk}")
    assert alert.state == AlertState.ACTIVE and alert.emailed_start_at is None
    assert "Could not e-mail alert" in caplog.text

    mailbox = smtp.start()  # the mail server is back (on a new port the settings now name)
    assert sweep(t0 + timedelta(minutes=2)) == {"started": 1, "ended": 0, "failed": 0}
    assert sweep(t0 + timedelta(minutes=3)) == {"started": 0, "ended": 0, "failed": 0}
    assert len(mailbox.mails) == 1
    assert mailbox.mails[0].subject.startswith("[Lifeboat central] Warning: RPO of central-web-01 is 20 min")


# --- the scheduled path ------------------------------------------------------------------


def test_monitor_task_on_the_worker_mails_new_problems_only(smtp, celery_worker):
    from replication.tasks import monitor

    now = timezone.now()
    _, first = breaching_vault(name="alpha", alert_emails=["alpha@example.com"])
    set_point(first, now - timedelta(minutes=20))
    ProtectedItem.objects.update(agent_last_heartbeat_at=now)

    monitor.delay()
    wait_for(lambda: len(smtp.mails) >= 1, timeout=30, message="the alert mail from the worker's monitor task")
    wait_for(lambda: Alert.objects.filter(vault__name="alpha", emailed_start_at__isnull=False).exists(),
             timeout=30, message="the alert marked as mailed")
    assert smtp.mails[0].rcpt_tos == ["alpha@example.com"]
    assert "alpha-web-01" in smtp.mails[0].subject

    # A second run mails the new problem of another vault, and not the first one again.
    _, second = breaching_vault(name="beta", alert_emails=["beta@example.com"])
    set_point(second, timezone.now() - timedelta(minutes=20))
    ProtectedItem.objects.update(agent_last_heartbeat_at=timezone.now())
    monitor.delay()
    wait_for(lambda: len(smtp.mails) >= 2, timeout=30, message="the second vault's alert mail")
    wait_for(lambda: Alert.objects.filter(vault__name="beta", emailed_start_at__isnull=False).exists(),
             timeout=30, message="the second alert marked as mailed")
    assert [m.rcpt_tos for m in smtp.mails] == [["alpha@example.com"], ["beta@example.com"]]


@pytest.mark.django_db
def test_many_alerts_starting_together_are_one_mail_per_vault_and_one_when_they_end(smtp, t0):
    """A site cut off: every item breaches at once. One mail lists them all (per vault, at
    most 100 a mail), and one more says they ended; each alert is marked mailed."""
    from vault import notifications

    vault, first = breaching_vault(name="east", alert_emails=RECIPIENTS)
    items = [first] + [ProtectedItemFactory(vault=vault, machine=MachineFactory(vault=vault, name=f"east-db-{n:02d}"),
                                            policy=first.policy, process_server=first.process_server,
                                            protection_state=P.PROTECTED) for n in range(4)]
    _, lone = breaching_vault(name="west", alert_emails=["west@example.com"])
    for item in items + [lone]:
        set_point(item, t0 - timedelta(minutes=20))

    assert sweep(t0) == {"started": 6, "ended": 0, "failed": 0}
    east = [m for m in smtp.mails if m.subject.startswith("[Lifeboat east]")]
    west = [m for m in smtp.mails if m.subject.startswith("[Lifeboat west]")]
    assert len(smtp.mails) == 2 and len(east) == len(west) == 1
    assert east[0].subject == "[Lifeboat east] 5 alerts: 5 warning"
    for item in items:
        assert f"RPO of {item.name} is 20 min" in east[0].body and f"/items/{item.pk}/" in east[0].body
    assert west[0].subject.startswith("[Lifeboat west] Warning: RPO of west-web-01 is 20 min")  # alone: its own mail
    assert not Alert.objects.filter(vault=vault, emailed_start_at__isnull=True).exists()
    assert sweep(t0 + timedelta(minutes=1)) == {"started": 0, "ended": 0, "failed": 0}

    for item in items:
        set_point(item, t0 + timedelta(minutes=2))
    sweep(t0 + timedelta(minutes=2))  # resolved now, mailed after the quiet period
    assert sweep(t0 + timedelta(minutes=2, seconds=QUIET + 1)) == {"started": 0, "ended": 5, "failed": 0}
    (ended,) = ends(smtp.mails)
    assert ended.subject == "[Lifeboat east] Resolved: 5 problems have ended"
    assert all(item.name in ended.body for item in items)

    # More than a mail holds: cut into mails of DIGEST_MOST.
    later = t0 + timedelta(hours=2)
    notifications.DIGEST_MOST, most = 2, notifications.DIGEST_MOST
    try:
        for item in items:
            set_point(item, later - timedelta(minutes=20))
        before = len(smtp.mails)
        assert sweep(later)["started"] == 5
        mails = smtp.mails[before:]
        assert [m.subject.split("] ")[1][:18] for m in mails] == ["2 alerts: 2 warnin", "2 alerts: 2 warnin",
                                                                   "Warning: RPO of ea"]
        assert sorted(name for m in mails for name in (i.name for i in items) if f"RPO of {name} " in m.body) == \
            sorted(i.name for i in items)
    finally:
        notifications.DIGEST_MOST = most
