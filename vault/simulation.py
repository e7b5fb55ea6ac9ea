"""The simulated VMware site's controls that only make sense for it (the demo's churn)."""
from __future__ import annotations

from core.exceptions import LifeboatError, ValidationFailed
from vault.choices import VCenterKind
from vault.connectors import ConnectorError
from vault.discovery import connector_for
from vault.models import DiscoveredMachine

PATTERNS = ("uniform", "hotspot", "sequential")


def machine_workload(*, machine: DiscoveredMachine) -> dict | None:
    """The simulated VM's workload settings, or None for a real machine."""
    if machine.vcenter is None or machine.vcenter.kind != VCenterKind.SIMULATED:
        return None
    site = connector_for(machine.vcenter)
    vm = site.read_state().get("vms", {}).get(machine.instance_uuid) or {}
    return vm.get("workload")


def machine_set_workload(*, machine: DiscoveredMachine, rate_bytes_per_s: int, write_size: int, pattern: str) -> None:
    if machine.vcenter is None or machine.vcenter.kind != VCenterKind.SIMULATED:
        raise ValidationFailed(f"{machine.name} is not on the simulated site: its workload is its own.")
    site = connector_for(machine.vcenter)
    try:
        site.connect()
        site.set_workload(machine.instance_uuid, rate_bytes_per_s=rate_bytes_per_s, write_size=write_size, pattern=pattern)
    except (ConnectorError, ValueError) as exc:
        raise LifeboatError(str(exc)) from None
    finally:
        site.close()
