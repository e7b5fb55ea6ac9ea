"""Seed the embedded-default demo: an admin, a vault, a policy, a simulated VMware site with
VMs writing data, a process server, discovery, a simulated recovery site with a recovery and
a test network, and protection of every demo VM mapped to that site.

Idempotent: run again, it keeps what exists and prints the credentials again.
"""
from __future__ import annotations

import json
import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from core.exceptions import LifeboatError
from replication.process_servers import process_server_config
from replication.services import protected_item_enable, protected_item_set_recovery
from vault import services
from vault.choices import VCenterKind
from vault.connectors.simulated import SimulatedSite
from vault.discovery import connector_for, machines_upsert
from vault.models import MasterTargetServer, NetworkPurpose, ProcessServer, RecoverySite, RecoverySiteKind, ReplicationPolicy, Vault, VCenter

MiB = 1024 * 1024
DEMO_VMS = [
    {"name": "app-01", "disks": [64 * MiB, 32 * MiB], "guest_os": "ubuntu64Guest",
     "workload": {"rate_bytes_per_s": 256 * 1024, "write_size": 16 * 1024, "pattern": "hotspot"}},
    {"name": "db-01", "disks": [96 * MiB], "guest_os": "windows2019srv_64Guest",
     "workload": {"rate_bytes_per_s": 512 * 1024, "write_size": 8 * 1024, "pattern": "uniform"}},
    {"name": "web-01", "disks": [48 * MiB], "guest_os": "centos8_64Guest",
     "workload": {"rate_bytes_per_s": 64 * 1024, "write_size": 4 * 1024, "pattern": "sequential"}},
    {"name": "web-02", "disks": [48 * MiB], "guest_os": "centos8_64Guest",
     "workload": {"rate_bytes_per_s": 64 * 1024, "write_size": 4 * 1024, "pattern": "uniform"}},
]


class Command(BaseCommand):
    help = "Create the demo vault on the simulated VMware site (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--no-protect", action="store_true", help="Discover the demo VMs but do not protect them.")

    def handle(self, *args, **options):
        data = settings.DATA_DIR
        data.mkdir(parents=True, exist_ok=True)
        secrets_file = data / "demo-credentials.json"
        creds = json.loads(secrets_file.read_text()) if secrets_file.exists() else {
            "admin_password": secrets.token_urlsafe(12),
            "vault_passphrase": secrets.token_urlsafe(18),
            "site_password": secrets.token_urlsafe(12),
        }
        secrets_file.write_text(json.dumps(creds))
        os.chmod(secrets_file, 0o600)

        User = get_user_model()
        admin = User.objects.filter(username="admin").first()
        if admin is None:
            admin = User.objects.create_superuser("admin", "admin@localhost", creds["admin_password"])

        vault = Vault.objects.filter(name="demo-vault").first() or services.vault_create(
            name="demo-vault", passphrase=creds["vault_passphrase"], description="The embedded demo.",
            alert_emails=["dr-team@localhost"],
            # The demo's off-hours window is the whole day, so a needed resync runs on its own.
            off_hours_start="00:00", off_hours_end="00:00",
        )
        policy = ReplicationPolicy.objects.filter(vault=vault, name="demo-policy").first() or services.policy_create(
            vault=vault, name="demo-policy", storage_tier="standard", rpo_threshold_minutes=2,
            recovery_point_retention_hours=24, app_consistent_frequency_hours=1, crash_consistent_frequency_seconds=15,
        )
        ps = ProcessServer.objects.filter(vault=vault, name="ps-01").first() or services.process_server_create(
            vault=vault, name="ps-01", host="127.0.0.1", data_port=int(os.environ.get("LIFEBOAT_PS_PORT", "9443")),
        )
        ps_config = data / "process-server-ps-01.json"
        config = process_server_config(server=ps)
        # The demo's process server is sized for 16 MiB/s, so raising a VM's churn above it
        # visibly builds a backlog and RPO climbs; lowering it drains the backlog.
        config.update(max_ingest_bytes_per_s=16 * MiB, report_interval=10)
        ps_config.write_text(json.dumps(config, indent=2))
        os.chmod(ps_config, 0o600)

        # Failback: a process server in the recovery site (the recovered VMs' agents send to it)
        # and a master target server on-premises (it writes the on-premises disks).
        recovery_ps = ProcessServer.objects.filter(vault=vault, name="ps-recovery").first() or services.process_server_create(
            vault=vault, name="ps-recovery", host="127.0.0.1", site="RECOVERY",
            data_port=int(os.environ.get("LIFEBOAT_RECOVERY_PS_PORT", "9444")),
        )
        recovery_config = process_server_config(server=recovery_ps)
        recovery_config.update(report_interval=10)
        recovery_ps_config = data / "process-server-ps-recovery.json"
        recovery_ps_config.write_text(json.dumps(recovery_config, indent=2))
        os.chmod(recovery_ps_config, 0o600)
        if not MasterTargetServer.objects.filter(vault=vault, name="mt-01").exists():
            services.master_target_server_create(vault=vault, name="mt-01", host="127.0.0.1", site="PRIMARY")

        site_dir = data / "simsite"
        if not (site_dir / "site.json").exists():
            SimulatedSite.create(site_dir, user="administrator@sim.local", password=creds["site_password"], vms=DEMO_VMS,
                                 datastores=("datastore1", "datastore2"))
        vcenter = VCenter.objects.filter(vault=vault, name="simulated-site").first() or services.vcenter_create(
            vault=vault, name="simulated-site", kind=VCenterKind.SIMULATED, host=str(site_dir), port=443,
            username="administrator@sim.local", password=creds["site_password"],
        )
        with connector_for(vcenter) as site:
            summary = machines_upsert(vcenter=vcenter, vms=site.discover().vms)
        # Where the demo's VMs fail over to: a simulated recovery site beside the source site,
        # whose recovered VMs write to their disks like the source VMs do (scripts/run.py runs
        # its workload too).
        recovery_dir = data / "recovery-site"
        recovery_site = RecoverySite.objects.filter(vault=vault, name="recovery-site").first() or services.recovery_site_create(
            vault=vault, name="recovery-site", kind=RecoverySiteKind.SIMULATED, host=str(recovery_dir),
            networks=[{"name": "recovery-net", "purpose": NetworkPurpose.RECOVERY},
                      {"name": "test-net", "purpose": NetworkPurpose.TEST}],
        )
        with recovery_site.connector() as recovery:
            recovery.networks()  # lays out the site's data directory on first use
        protected = 0
        if not options["no_protect"]:
            for machine in vault.machines.filter(vcenter=vcenter, protected_items__isnull=True):
                try:
                    with transaction.atomic():
                        protected_item_enable(vault=vault, machine=machine, policy=policy, process_server=ps,
                                              recovery_site=recovery_site, user=admin)
                    protected += 1
                except LifeboatError as exc:
                    self.stderr.write(f"{machine.name}: {exc.message}")
        for item in vault.protected_items.filter(recovery_site__isnull=True):
            try:
                protected_item_set_recovery(item=item, recovery_site=recovery_site)
            except LifeboatError as exc:
                self.stderr.write(f"{item.name}: {exc.message}")
        self.stdout.write(self.style.SUCCESS(
            f"Demo ready: vault {vault.name}, {summary['machines_found']} simulated VMs, {protected} newly protected, "
            f"recovery site {recovery_site.name} ({recovery_dir}).\n"
            f"  Portal:  {settings.LIFEBOAT_PORTAL_URL}  user: admin  password: {creds['admin_password']}\n"
            f"  Vault registration passphrase (for agents): {creds['vault_passphrase']}\n"
            f"  Alert e-mails are written to {data / 'mail'}"
        ))
