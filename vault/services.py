"""Services of the vault: functions that change state. Views and serializers call these."""
from __future__ import annotations

import base64
import logging
import socket
from datetime import time as dtime
from typing import NamedTuple

from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from django.utils import timezone

from core.exceptions import Conflict, ValidationFailed
from core.secrets import decrypt_secret, encrypt_secret
from replication.dataplane.sealing import new_key
from vault.choices import AlertState, Severity, VCenterKind
from vault.models import (
    Alert,
    ConfigurationServer,
    Event,
    MasterTargetServer,
    NetworkPurpose,
    ProcessServer,
    RecoveryNetwork,
    RecoverySite,
    RecoverySiteKind,
    ReplicationPolicy,
    Vault,
    VCenter,
)

logger = logging.getLogger(__name__)

MIN_PASSPHRASE_LENGTH = 16


def _full_clean(obj, *, exclude=None) -> None:
    obj.full_clean(exclude=exclude, validate_unique=True)


# --- vaults ----------------------------------------------------------------------------


def vault_create(
    *,
    name: str,
    passphrase: str,
    description: str = "",
    off_hours_start: dtime | str = "22:00",
    off_hours_end: dtime | str = "06:00",
    off_hours_time_zone: str = "UTC",
    alert_emails: list[str] | None = None,
    email_alerts_enabled: bool = True,
) -> Vault:
    if not passphrase or len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise ValidationFailed(
            f"The registration passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters long.",
            extra={"fields": {"passphrase": ["too short"]}},
        )

    vault = Vault(
        name=name,
        description=description,
        passphrase_hash=make_password(passphrase),
        off_hours_start=off_hours_start,
        off_hours_end=off_hours_end,
        off_hours_time_zone=off_hours_time_zone,
        alert_emails=list(alert_emails or []),
        email_alerts_enabled=email_alerts_enabled,
        seal_key_encrypted=encrypt_secret(new_key()),
        auth_key_encrypted=encrypt_secret(new_key()),
    )
    _full_clean(vault)
    with transaction.atomic():
        vault.save()
        ConfigurationServer.objects.create(vault=vault, name=socket.gethostname() or "lifeboat", host="127.0.0.1")
    return vault


def vault_update(*, vault: Vault, passphrase: str | None = None, **fields) -> Vault:
    for name, value in fields.items():
        setattr(vault, name, value)
    if passphrase is not None:
        if len(passphrase) < MIN_PASSPHRASE_LENGTH:
            raise ValidationFailed(
                f"The registration passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters long."
            )
        vault.passphrase_hash = make_password(passphrase)
    _full_clean(vault)
    vault.save()
    return vault


def vault_keys(*, vault: Vault) -> tuple[bytes, bytes]:
    """(seal key, auth key) of the vault, decrypted."""
    return decrypt_secret(vault.seal_key_encrypted), decrypt_secret(vault.auth_key_encrypted)


# --- policies --------------------------------------------------------------------------

POLICY_FIELDS = (
    "storage_tier",
    "rpo_threshold_minutes",
    "recovery_point_retention_hours",
    "app_consistent_frequency_hours",
    "crash_consistent_frequency_seconds",
)


def policy_create(*, vault: Vault, name: str, **settings_) -> ReplicationPolicy:
    """Create a replication policy and, alongside it, its failback policy."""
    unknown = set(settings_) - set(POLICY_FIELDS)
    if unknown:
        raise ValidationFailed(f"Unknown policy settings: {', '.join(sorted(unknown))}.")
    policy = ReplicationPolicy(vault=vault, name=name, **settings_)
    _full_clean(policy)
    failback = ReplicationPolicy(vault=vault, name=_failback_name(name), is_failback=True, **settings_)
    _full_clean(failback)
    try:
        with transaction.atomic():
            failback.save()
            policy.failback_policy = failback
            policy.save()
    except IntegrityError:
        raise Conflict(f"A policy named '{name}' (or its failback policy) already exists in this vault.") from None
    return policy


def policy_update(*, policy: ReplicationPolicy, **fields) -> ReplicationPolicy:
    if policy.is_failback:
        raise ValidationFailed("A failback policy follows its replication policy; edit that one instead.")
    for field, value in fields.items():
        if field not in POLICY_FIELDS and field != "name":
            raise ValidationFailed(f"'{field}' cannot be changed.")
        setattr(policy, field, value)
    _full_clean(policy)
    with transaction.atomic():
        policy.save()
        if policy.failback_policy_id:
            failback = policy.failback_policy
            for field in POLICY_FIELDS:
                setattr(failback, field, getattr(policy, field))
            failback.name = _failback_name(policy.name)
            _full_clean(failback)
            failback.save()
    return policy


def policy_delete(*, policy: ReplicationPolicy) -> None:
    if policy.is_failback:
        raise ValidationFailed("A failback policy is deleted with its replication policy.")
    if policy.protected_items.exists():
        raise Conflict("This policy protects items; move them to another policy or disable their replication first.")
    with transaction.atomic():
        failback = policy.failback_policy
        policy.delete()
        if failback is not None:
            failback.delete()


def _failback_name(name: str) -> str:
    return f"{name}-failback"


# --- infrastructure servers ------------------------------------------------------------


def process_server_create(*, vault: Vault, name: str, host: str, data_port: int = 9443, site: str = "PRIMARY") -> ProcessServer:
    server = ProcessServer(vault=vault, name=name, host=host, data_port=data_port, site=site)
    _full_clean(server)
    server.save()
    return server


def master_target_server_create(*, vault: Vault, name: str, host: str, site: str = "PRIMARY") -> MasterTargetServer:
    server = MasterTargetServer(vault=vault, name=name, host=host, site=site)
    _full_clean(server)
    server.save()
    return server


def vcenter_create(
    *,
    vault: Vault,
    name: str,
    host: str,
    username: str,
    password: str,
    port: int = 443,
    kind: str = VCenterKind.VCENTER,
    allow_untrusted: bool = False,
    thumbprint: str = "",
    discovery_interval_minutes: int = 15,
) -> VCenter:
    if not password:
        raise ValidationFailed("A password is required.", extra={"fields": {"password": ["required"]}})
    vcenter = VCenter(
        vault=vault,
        name=name,
        host=host,
        port=port,
        username=username,
        kind=kind,
        allow_untrusted=allow_untrusted,
        thumbprint=thumbprint,
        discovery_interval_minutes=discovery_interval_minutes,
        password_encrypted=encrypt_secret(password),
    )
    _full_clean(vcenter)
    vcenter.save()
    return vcenter


def vcenter_update(*, vcenter: VCenter, password: str | None = None, **fields) -> VCenter:
    for field, value in fields.items():
        setattr(vcenter, field, value)
    if password:
        vcenter.password_encrypted = encrypt_secret(password)
    _full_clean(vcenter)
    vcenter.save()
    return vcenter


def vcenter_delete(*, vcenter: VCenter) -> None:
    """Remove a vCenter and the machines discovered on it: 409 while any of them is protected."""
    with transaction.atomic():
        vcenter = VCenter.objects.select_for_update().get(pk=vcenter.pk)
        protected = sorted(vcenter.machines.filter(protected_items__isnull=False).values_list("name", flat=True).distinct())
        if protected:
            raise Conflict(
                f"The vCenter {vcenter.name} still has {len(protected)} protected machine(s) ({', '.join(protected[:5])}): "
                "disable replication of them first, then delete the vCenter.",
                code="in_use",
            )
        vcenter.delete()


def vault_delete(*, vault: Vault) -> None:
    """Remove an empty vault: 409 while it protects machines (their replicas live in it)."""
    with transaction.atomic():
        vault = Vault.objects.select_for_update().get(pk=vault.pk)
        count = vault.protected_items.count()
        if count:
            raise Conflict(
                f"The vault {vault.name} still protects {count} machine(s): disable replication of them first, "
                "then delete the vault.",
                code="in_use",
            )
        try:
            vault.delete()
        except ProtectedError:
            raise Conflict(f"The vault {vault.name} is still in use: remove what it holds first.", code="in_use") from None


def vcenter_password(*, vcenter: VCenter) -> str:
    return decrypt_secret(vcenter.password_encrypted).decode()


# --- recovery sites --------------------------------------------------------------------

RECOVERY_SITE_FIELDS = ("name", "kind", "host", "port", "username", "allow_untrusted", "thumbprint", "datacenter", "datastore", "placement")


def _networks_check(networks, *, site_name: str) -> list[dict]:
    """[{name, purpose}] or [(name, purpose)]: names unique, at least one recovery and one
    test network."""
    cleaned, seen = [], set()
    for n in networks:
        if isinstance(n, dict):
            name, purpose = str(n.get("name", "")).strip(), n.get("purpose", NetworkPurpose.RECOVERY)
        else:
            name, purpose = str(n[0]).strip(), n[1]
        if not name:
            raise ValidationFailed("Every network needs a name.", extra={"fields": {"networks": ["a network has no name"]}})
        if purpose not in NetworkPurpose.values:
            raise ValidationFailed(f"'{purpose}' is not a network purpose; use RECOVERY or TEST.",
                                   extra={"fields": {"networks": ["unknown purpose"]}})
        if name in seen:
            raise ValidationFailed(f"The network '{name}' is listed twice.", extra={"fields": {"networks": ["duplicate name"]}})
        seen.add(name)
        cleaned.append({"name": name, "purpose": purpose})
    purposes = {n["purpose"] for n in cleaned}
    missing = [NetworkPurpose(p).label.lower() for p in (NetworkPurpose.RECOVERY, NetworkPurpose.TEST) if p not in purposes]
    if missing:
        raise ValidationFailed(
            f"The recovery site {site_name} needs at least one {' and one '.join(missing)}.",
            extra={"fields": {"networks": [f"no {m}" for m in missing]}},
        )
    return cleaned


def recovery_site_create(
    *,
    vault: Vault,
    name: str,
    host: str,
    networks: list[dict] | list[tuple[str, str]],
    kind: str = RecoverySiteKind.SIMULATED,
    port: int = 443,
    username: str = "",
    password: str = "",
    allow_untrusted: bool = False,
    thumbprint: str = "",
    datacenter: str = "",
    datastore: str = "",
    placement: str = "",
) -> RecoverySite:
    """A recovery site with its networks (at least one recovery and one test network)."""
    if kind == RecoverySiteKind.VSPHERE and not password:
        raise ValidationFailed("A vSphere recovery site needs a password.", extra={"fields": {"password": ["required"]}})
    site = RecoverySite(
        vault=vault, name=name, kind=kind, host=host, port=port, username=username, allow_untrusted=allow_untrusted,
        thumbprint=thumbprint, datacenter=datacenter, datastore=datastore, placement=placement,
        password_encrypted=encrypt_secret(password) if password else "",
    )
    if RecoverySite.objects.filter(vault=vault, name=name).exists():
        raise Conflict(f"A recovery site named '{name}' already exists in this vault.")
    _full_clean(site)
    cleaned = _networks_check(networks, site_name=name)
    try:
        with transaction.atomic():
            site.save()
            for n in cleaned:
                network = RecoveryNetwork(site=site, **n)
                _full_clean(network)
                network.save()
    except IntegrityError:
        raise Conflict(f"A recovery site named '{name}' already exists in this vault.") from None
    return site


def recovery_site_update(*, site: RecoverySite, password: str | None = None, **fields) -> RecoverySite:
    for field, value in fields.items():
        if field not in RECOVERY_SITE_FIELDS:
            raise ValidationFailed(f"'{field}' cannot be changed.")
        setattr(site, field, value)
    if password:
        site.password_encrypted = encrypt_secret(password)
    if site.kind == RecoverySiteKind.VSPHERE and not site.password_encrypted:
        raise ValidationFailed("A vSphere recovery site needs a password.", extra={"fields": {"password": ["required"]}})
    if RecoverySite.objects.filter(vault=site.vault_id, name=site.name).exclude(pk=site.pk).exists():
        raise Conflict(f"A recovery site named '{site.name}' already exists in this vault.")
    _full_clean(site)
    site.save()
    return site


def _site_in_use(site: RecoverySite) -> str:
    # Reverse relations only: the items and recovered VMs live in apps vault must not import.
    items = list(site.protected_items.values_list("name", flat=True)[:3])
    if items:
        return f"it is the recovery site of {', '.join(items)}; map those items to another site first"
    vms = list(site.recovered_vms.filter(removed_at__isnull=True).values_list("name", flat=True)[:3])
    if vms:
        return f"the recovered VMs {', '.join(vms)} run there; clean them up (or fail back) first"
    return ""


def recovery_site_delete(*, site: RecoverySite) -> None:
    reason = _site_in_use(site)
    if reason:
        raise Conflict(f"The recovery site {site.name} cannot be deleted: {reason}.", code="in_use")
    try:
        with transaction.atomic():
            site.delete()
    except ProtectedError:  # a removed recovered VM still records the site: keep it
        raise Conflict(
            f"The recovery site {site.name} cannot be deleted: past test failovers and failovers record it.", code="in_use"
        ) from None


def recovery_site_password(*, site: RecoverySite) -> str:
    return decrypt_secret(site.password_encrypted).decode()


def recovery_network_create(*, site: RecoverySite, name: str, purpose: str = NetworkPurpose.RECOVERY) -> RecoveryNetwork:
    network = RecoveryNetwork(site=site, name=(name or "").strip(), purpose=purpose)
    if RecoveryNetwork.objects.filter(site=site, name=network.name).exists():
        raise Conflict(f"The recovery site {site.name} already has a network named '{network.name}'.")
    _full_clean(network)
    network.save()
    return network


def recovery_network_delete(*, network: RecoveryNetwork) -> None:
    site = network.site
    users = [*network.items_recovering.values_list("name", flat=True)[:3], *network.items_testing.values_list("name", flat=True)[:3]]
    if users:
        raise Conflict(f"The network {network.name} is mapped for {', '.join(users)}; map them to another network first.", code="in_use")
    if network.recovered_vms.filter(removed_at__isnull=True).exists():
        raise Conflict(f"Recovered VMs run on the network {network.name}.", code="in_use")
    if not site.networks.filter(purpose=network.purpose).exclude(pk=network.pk).exists():
        raise ValidationFailed(
            f"{network.name} is the last {network.get_purpose_display().lower()} of {site.name}; a recovery site needs one."
        )
    try:
        network.delete()
    except ProtectedError:
        raise Conflict(f"Past test failovers and failovers record the network {network.name}; it is kept.", code="in_use") from None


# --- events and alerts -----------------------------------------------------------------


def event_record(*, vault: Vault, kind: str, message: str, severity: str = Severity.INFO, **links) -> Event:
    return Event.objects.create(vault=vault, kind=kind, message=message, severity=severity, **links)


def alert_raise(
    *, vault: Vault, key: str, kind: str, message: str, severity: str = Severity.WARNING, now=None, **links
) -> tuple[Alert, bool]:
    """Raise the alert for ``key`` unless one is already active. Returns (alert, created).

    A problem that comes back within the quiet period reopens its alert instead of raising a
    new one, so a flapping condition is one alert and one e-mail, not one per sweep. ``now``
    is the time the caller judged the problem at (a monitoring sweep's), the wall clock if
    not given.
    """
    existing = Alert.objects.filter(vault=vault, key=key, state=AlertState.ACTIVE).first()
    if existing is not None:
        if existing.message != message or existing.severity != severity:
            existing.message, existing.severity = message, severity
            existing.save(update_fields=["message", "severity"])
        return existing, False
    quiet_since = (now or timezone.now()) - timezone.timedelta(seconds=settings.LIFEBOAT_ALERT_QUIET_SECONDS)
    recent = (
        Alert.objects.filter(vault=vault, key=key, state=AlertState.RESOLVED, resolved_at__gte=quiet_since, emailed_end_at__isnull=True)
        .order_by("-resolved_at")
        .first()
    )
    if recent is not None:
        recent.state, recent.resolved_at, recent.message, recent.severity = AlertState.ACTIVE, None, message, severity
        try:
            with transaction.atomic():
                recent.save(update_fields=["state", "resolved_at", "message", "severity"])
        except IntegrityError:
            return Alert.objects.get(vault=vault, key=key, state=AlertState.ACTIVE), False
        return recent, False
    try:
        with transaction.atomic():
            alert = Alert.objects.create(vault=vault, key=key, kind=kind, message=message, severity=severity, **links)
    except IntegrityError:  # raised concurrently by another sweep
        existing = Alert.objects.filter(vault=vault, key=key, state=AlertState.ACTIVE).first()
        if existing is None:  # no race on the key: a row the alert links to is gone
            raise
        return existing, False
    event_record(vault=vault, kind=kind, message=message, severity=severity, **links)
    return alert, True


class AlertChange(NamedTuple):
    """One alert a sweep raises or resolves (``alerts_apply``); ``links`` are the Alert's and
    Event's foreign keys (``protected_item``, ``process_server``)."""

    vault: Vault
    key: str
    kind: str
    message: str
    severity: str = Severity.WARNING
    links: dict | None = None


def alerts_apply(*, raise_: list[AlertChange], resolve: list[AlertChange], now=None) -> tuple[int, int]:
    """What ``alert_raise`` does, and the resolving of alerts, for many alerts at once, in a constant
    number of queries: a sweep that finds a hundred problems starting together (a process
    server down, a site cut off) writes them in a few statements, not a few per alert.
    ``raise_`` holds keys the caller found not active, ``resolve`` keys it found active
    (``kind`` unused there: the alert keeps its own; ``message`` is the "resolved" event's).
    If another sweep raced on a key, the alerts are written one by one instead (the same
    rules). Returns (alerts newly raised, alerts resolved)."""
    now = now or timezone.now()
    raised = resolved = 0
    if raise_:
        try:
            with transaction.atomic():
                raised = _alerts_raise(raise_, now)
        except IntegrityError:  # a key raised meanwhile, or a linked row deleted: the careful way
            raised = 0  # the bulk count was rolled back with its rows
            for c in raise_:
                try:
                    raised += alert_raise(vault=c.vault, key=c.key, kind=c.kind, message=c.message,
                                          severity=c.severity, now=now, **(c.links or {}))[1]
                except IntegrityError:
                    if _links_exist(c.links):
                        raise
                    # The item or process server was deleted after the sweep read it: its
                    # alert has nothing left to be about.
    if resolve:
        by_key = {(c.vault.pk, c.key): c for c in resolve}
        with transaction.atomic():
            open_ = list(Alert.objects.select_for_update().filter(
                key__in={c.key for c in resolve}, state=AlertState.ACTIVE).only(
                "pk", "vault_id", "key", "kind", "protected_item_id", "process_server_id"))
            open_ = [a for a in open_ if (a.vault_id, a.key) in by_key]
            Alert.objects.filter(pk__in=[a.pk for a in open_]).update(state=AlertState.RESOLVED, resolved_at=now)
            Event.objects.bulk_create([
                Event(vault=by_key[a.vault_id, a.key].vault, kind=f"{a.kind}_resolved",
                      message=by_key[a.vault_id, a.key].message, severity=Severity.INFO,
                      protected_item_id=a.protected_item_id, process_server_id=a.process_server_id)
                for a in open_ if by_key[a.vault_id, a.key].message
            ])
        resolved = len(open_)
    return raised, resolved


def _links_exist(links: dict | None) -> bool:
    """Whether every row an alert's ``links`` name (by object or by id) still exists."""
    for name, value in (links or {}).items():
        model = Alert._meta.get_field(name).related_model
        if value is not None and not model.objects.filter(pk=getattr(value, "pk", value)).exists():
            return False
    return True


def _alerts_raise(changes: list[AlertChange], now) -> int:
    """The bulk half of ``alerts_apply`` for raised alerts (inside its transaction)."""
    quiet_since = now - timezone.timedelta(seconds=settings.LIFEBOAT_ALERT_QUIET_SECONDS)
    wanted = {(c.vault.pk, c.key): c for c in changes}
    recent: dict[tuple[int, str], Alert] = {}
    for alert in (Alert.objects.filter(key__in={c.key for c in changes}, state=AlertState.RESOLVED,
                                       resolved_at__gte=quiet_since, emailed_end_at__isnull=True)
                  .order_by("resolved_at")):
        if (alert.vault_id, alert.key) in wanted:
            recent[alert.vault_id, alert.key] = alert  # the newest wins
    for where, alert in recent.items():  # a problem back within the quiet period: its alert reopens
        c = wanted[where]
        alert.state, alert.resolved_at, alert.message, alert.severity = AlertState.ACTIVE, None, c.message, c.severity
    Alert.objects.bulk_update(list(recent.values()), ["state", "resolved_at", "message", "severity"])
    new = [c for where, c in wanted.items() if where not in recent]
    Alert.objects.bulk_create([Alert(vault=c.vault, key=c.key, kind=c.kind, message=c.message, severity=c.severity,
                                     **(c.links or {})) for c in new])
    Event.objects.bulk_create([Event(vault=c.vault, kind=c.kind, message=c.message, severity=c.severity, **(c.links or {}))
                               for c in new])
    return len(new)


def alert_acknowledge(*, alert: Alert, user) -> Alert:
    if not alert.acknowledged:
        alert.acknowledged, alert.acknowledged_at = True, timezone.now()
        alert.acknowledged_by = user if getattr(user, "is_authenticated", False) else None
        alert.save(update_fields=["acknowledged", "acknowledged_at", "acknowledged_by"])
    return alert


def job_failure_recorded(*, job) -> None:
    """A failed job is an event and an alert (one per job; the admin acknowledges it)."""
    if job.vault_id is None:
        return
    verb = "was cancelled" if job.state == "CANCELLED" else "failed"
    message = f"{job.get_type_display()} of {job.target_name or job.target_id} {verb}: {job.error}"
    if job.state == "CANCELLED":
        event_record(vault=job.vault, kind="job_cancelled", message=message, severity=Severity.INFO, job=job)
        return
    alert_raise(vault=job.vault, key=f"job:{job.id}", kind="job_failed", message=message, severity=Severity.WARNING, job=job)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()
