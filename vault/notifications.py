"""E-mail about alerts: one when a problem starts, one when it has ended. Never a flood.

A sweep sends the "started" mail for every active alert not mailed yet, and the "ended"
mail for every alert that was mailed and has stayed resolved for the quiet period (a
problem that comes back sooner reopens the same alert, see ``alert_raise``).
"""
from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.utils import timezone

from vault.choices import AlertState
from vault.models import Alert

logger = logging.getLogger(__name__)


def _portal_link(alert: Alert) -> str:
    base = settings.LIFEBOAT_PORTAL_URL.rstrip("/")
    if alert.protected_item_id:
        return f"{base}/items/{alert.protected_item_id}/"
    if alert.job_id:
        return f"{base}/jobs/{alert.job_id}/"
    return f"{base}/alerts/"


def _message(alert: Alert, *, ended: bool) -> EmailMessage:
    vault = alert.vault
    if ended:
        subject = f"[Lifeboat {vault.name}] Resolved: {alert.message}"[:200]
        body = (
            f"The problem below has ended (resolved at {alert.resolved_at:%Y-%m-%d %H:%M:%S %Z}).\n\n"
            f"{alert.message}\n\nRaised at {alert.raised_at:%Y-%m-%d %H:%M:%S %Z}.\n{_portal_link(alert)}\n"
        )
    else:
        subject = f"[Lifeboat {vault.name}] {alert.get_severity_display()}: {alert.message}"[:200]
        body = (
            f"{alert.message}\n\nSeverity: {alert.get_severity_display()}\n"
            f"Raised at {alert.raised_at:%Y-%m-%d %H:%M:%S %Z}.\n"
            f"You will get one more e-mail when it ends.\n{_portal_link(alert)}\n"
        )
    return EmailMessage(subject=subject, body=body, to=list(vault.alert_emails))


def alerts_notify(*, now=None) -> dict:
    """Send what is due; returns how many mails of each kind went out."""
    now = now or timezone.now()
    quiet = timedelta(seconds=settings.LIFEBOAT_ALERT_QUIET_SECONDS)
    wanted = Alert.objects.select_related("vault").filter(vault__email_alerts_enabled=True).exclude(vault__alert_emails=[])
    starts = list(wanted.filter(state=AlertState.ACTIVE, emailed_start_at__isnull=True))
    ends = list(
        wanted.filter(state=AlertState.RESOLVED, emailed_start_at__isnull=False, emailed_end_at__isnull=True, resolved_at__lte=now - quiet)
    )
    sent = {"started": 0, "ended": 0, "failed": 0}
    if not starts and not ends:
        return sent
    connection = get_connection(fail_silently=False)
    for alert, ended in [(a, False) for a in starts] + [(a, True) for a in ends]:
        field = "emailed_end_at" if ended else "emailed_start_at"
        try:
            delivered = connection.send_messages([_message(alert, ended=ended)])
            if not delivered:
                raise OSError("the mail server accepted nothing")
        except Exception as exc:  # noqa: BLE001 - the SMTP server's error is logged; the next sweep retries
            logger.warning("Could not e-mail alert %s: %s", alert.pk, exc)
            sent["failed"] += 1
            continue
        Alert.objects.filter(pk=alert.pk).update(**{field: timezone.now()})
        sent["ended" if ended else "started"] += 1
    # Alerts resolved before they were ever mailed need no mail at all.
    Alert.objects.filter(state=AlertState.RESOLVED, emailed_start_at__isnull=True, emailed_end_at__isnull=True, resolved_at__lte=now - quiet).update(emailed_end_at=now)
    return sent
