"""E-mail about alerts: one when a problem starts, one when it has ended. Never a flood.

A sweep sends the "started" mail for every active alert not mailed yet, and the "ended"
mail for every alert that was mailed and has stayed resolved for the quiet period (a
problem that comes back sooner reopens the same alert, see ``alert_raise``).

Alerts of one vault that a sweep finds due together go out as one mail listing them all
(at most ``DIGEST_MOST`` a mail): a site cut off raises an alert per item at once, and two
hundred mails to the same recipients are a flood nobody reads. One alert alone gets the mail
it always had. The alerts a mail covers are marked mailed in one statement once it is
delivered; a mail that fails leaves them due for the next sweep.
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


DIGEST_MOST = 100  # alerts listed in one mail


def _digest(alerts: list[Alert], *, ended: bool) -> EmailMessage:
    """One mail for several alerts of one vault that started (or ended) together."""
    vault = alerts[0].vault
    by_severity: dict[str, int] = {}
    for alert in alerts:
        by_severity[alert.get_severity_display()] = by_severity.get(alert.get_severity_display(), 0) + 1
    counts = ", ".join(f"{n} {label.lower()}" for label, n in sorted(by_severity.items()))
    if ended:
        subject = f"[Lifeboat {vault.name}] Resolved: {len(alerts)} problems have ended"
        lines = [f"These {len(alerts)} problems have ended:", ""]
        for alert in alerts:
            lines += [f"- {alert.message}", f"  raised at {alert.raised_at:%Y-%m-%d %H:%M:%S %Z}, resolved at "
                      f"{alert.resolved_at:%Y-%m-%d %H:%M:%S %Z}. {_portal_link(alert)}"]
    else:
        subject = f"[Lifeboat {vault.name}] {len(alerts)} alerts: {counts}"
        lines = [f"{len(alerts)} problems started ({counts}):", ""]
        for alert in alerts:
            lines += [f"- {alert.get_severity_display()}: {alert.message}",
                      f"  raised at {alert.raised_at:%Y-%m-%d %H:%M:%S %Z}. {_portal_link(alert)}"]
        lines += ["", "You will get one more e-mail when they end (those that end together, in one e-mail)."]
    return EmailMessage(subject=subject[:200], body="\n".join(lines) + "\n", to=list(vault.alert_emails))


def _mails(alerts: list[Alert]) -> list[list[Alert]]:
    """The alerts cut into the mails that carry them: per vault, at most DIGEST_MOST a mail."""
    by_vault: dict[int, list[Alert]] = {}
    for alert in alerts:
        by_vault.setdefault(alert.vault_id, []).append(alert)
    return [group[at:at + DIGEST_MOST] for group in by_vault.values() for at in range(0, len(group), DIGEST_MOST)]


def alerts_notify(*, now=None) -> dict:
    """Send what is due; returns how many alerts were mailed (started, ended) or failed to be."""
    now = now or timezone.now()
    quiet = timedelta(seconds=settings.LIFEBOAT_ALERT_QUIET_SECONDS)
    wanted = Alert.objects.select_related("vault").filter(vault__email_alerts_enabled=True).exclude(vault__alert_emails=[])
    starts = list(wanted.filter(state=AlertState.ACTIVE, emailed_start_at__isnull=True).order_by("raised_at"))
    ends = list(
        wanted.filter(state=AlertState.RESOLVED, emailed_start_at__isnull=False, emailed_end_at__isnull=True, resolved_at__lte=now - quiet)
        .order_by("resolved_at")
    )
    sent = {"started": 0, "ended": 0, "failed": 0}
    if not starts and not ends:
        return sent
    connection = get_connection(fail_silently=False)
    for group, ended in [(g, False) for g in _mails(starts)] + [(g, True) for g in _mails(ends)]:
        field = "emailed_end_at" if ended else "emailed_start_at"
        message = _message(group[0], ended=ended) if len(group) == 1 else _digest(group, ended=ended)
        try:
            delivered = connection.send_messages([message])
            if not delivered:
                raise OSError("the mail server accepted nothing")
        except Exception as exc:  # noqa: BLE001 - the SMTP server's error is logged; the next sweep retries
            logger.warning("Could not e-mail alert %s: %s", ", ".join(str(a.pk) for a in group), exc)
            sent["failed"] += len(group)
            continue
        Alert.objects.filter(pk__in=[a.pk for a in group]).update(**{field: timezone.now()})
        sent["ended" if ended else "started"] += len(group)
    # Alerts resolved before they were ever mailed need no mail at all.
    Alert.objects.filter(state=AlertState.RESOLVED, emailed_start_at__isnull=True, emailed_end_at__isnull=True, resolved_at__lte=now - quiet).update(emailed_end_at=now)
    return sent
