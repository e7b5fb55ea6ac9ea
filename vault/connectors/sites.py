"""Opening a site by kind: the one module that knows every connector.

The connectors import their base (``base``, ``recovery``); the base imports none of them,
so the choice by kind lives here, above both.
"""
from __future__ import annotations

from typing import Any

from vault.connectors.base import ConnectorError, SiteConnector
from vault.connectors.failback import FailbackTarget, SimulatedFailbackTarget, VSphereFailbackTarget
from vault.connectors.recovery import RecoverySiteConnector
from vault.connectors.recovery_sim import SimulatedRecoverySite
from vault.connectors.recovery_vsphere import VSphereRecoverySite
from vault.connectors.simulated import SimulatedSite
from vault.connectors.vsphere import VSphereConnector


def open_connector(kind: str, **params: Any) -> SiteConnector:
    """A connector for a site of the given kind ('vcenter' or 'simulated'), not yet connected.

    'vcenter': host, port=443, user, password, allow_untrusted=False, thumbprint=None,
    ca_file=None, timeout=30. 'simulated': data_dir, user, password.
    """
    if kind == "vcenter":
        return VSphereConnector(**params)
    if kind == "simulated":
        return SimulatedSite(**params)
    raise ValueError(f"Unknown site kind {kind!r}; expected 'vcenter' or 'simulated'")


def open_recovery_site(kind: str, **params: Any) -> RecoverySiteConnector:
    """A recovery-site connector, not yet connected.

    ``"simulated"``: ``data_dir`` (created on first use), ``networks`` (names; default
    ``["recovery-net", "test-net"]`` for a new site), optional ``workload`` that recovered
    VMs run once on (``rate_bytes_per_s``, ``write_size``, ``pattern``; default 64 KiB/s of
    4 KiB writes, hotspot), optional ``username``/``password`` a new site is created with
    (to open it later as a simulated source site, for failback). ``"vsphere"``: ``host``,
    ``port``, ``username``, ``password``, ``allow_untrusted``, ``thumbprint``, ``ca_file``,
    ``datacenter`` and ``datastore`` (each may be left empty when there is only one),
    ``placement`` (a host or cluster name; ``host_name`` or ``cluster`` work too; empty: the
    datacenter's first compute resource); networks are the datacenter's port groups.

    ``progress(text, fraction)`` callbacks are always called from the caller's thread.
    """
    if kind == "simulated":
        return SimulatedRecoverySite(**params)
    if kind == "vsphere":
        return VSphereRecoverySite(**params)
    raise ConnectorError(f"Unknown recovery site kind {kind!r}; expected 'simulated' or 'vsphere'")


def open_failback_target(kind: str, **params: Any) -> FailbackTarget:
    """The on-premises side of a failback, not yet connected; the same kinds and parameters
    as :func:`open_connector`.

    ``"vcenter"``: host, port=443, user, password, allow_untrusted=False, thumbprint=None,
    ca_file=None, timeout=30. ``"simulated"``: data_dir, user, password.

    ``progress(text, fraction)`` callbacks are always called from the caller's thread.
    """
    if kind == "vcenter":
        return VSphereFailbackTarget(**params)
    if kind == "simulated":
        return SimulatedFailbackTarget(**params)
    raise ConnectorError(f"Unknown failback target kind {kind!r}; expected 'vcenter' or 'simulated'")
