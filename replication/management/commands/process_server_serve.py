"""``manage.py process_server_serve``: a process server that registers itself with its vault.

For deployments that start process servers by the number (``docker compose up --scale
process-server=3``) rather than one by one. Each process server keeps its identity in a
state directory of its own (``--state-dir``: in Compose an anonymous volume per container,
which Compose keeps when it recreates the container): which ``ProcessServer`` it is, its
cache and its TLS certificate. On every start it

1. waits until the database answers and the vault exists (the web service migrates the
   database on its first start, and an administrator may create the vault later);
2. creates its ``ProcessServer`` row on the first start (named after the host), or finds it
   again, and records the address agents reach it at (``--host``/``--port``; by default
   this host's address on its network, and 9443);
3. writes its configuration file (keys included, 0600) into the state directory, with the
   cache beside it, and becomes the process server (``exec``): the very process ``python -m
   replication.dataplane.process_server --config FILE`` runs.

Its first heartbeat tells the vault its certificate; from then on agents may be sent to it
(enabling replication without naming a process server picks the least loaded one).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connections

from mobility.durable import replace_durably
from replication.process_servers import process_server_config
from vault.choices import Site
from vault.models import ProcessServer, Vault
from vault.services import process_server_create

logger = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
RETRY_SECONDS = 10


def _this_host_address() -> str:
    """The address other machines of this host's network reach it at."""
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


class Command(BaseCommand):
    help = "Run a process server that registers itself with its vault (for scaled deployments)."

    def add_arguments(self, parser):
        env = os.environ.get
        parser.add_argument("--vault", default=env("LIFEBOAT_PS_VAULT", ""),
                            help="The vault's name (LIFEBOAT_PS_VAULT); default: the only vault there is.")
        parser.add_argument("--state-dir", default=env("LIFEBOAT_PS_STATE_DIR", "/var/lib/lifeboat-ps"),
                            help="This process server's own directory: identity, configuration, cache, certificate.")
        parser.add_argument("--host", default=env("LIFEBOAT_PS_HOST", ""),
                            help="The address agents reach it at (LIFEBOAT_PS_HOST); default: this host's address.")
        parser.add_argument("--port", type=int, default=int(env("LIFEBOAT_PS_PORT", "9443")),
                            help="The HTTPS port agents send to (LIFEBOAT_PS_PORT).")
        parser.add_argument("--listen", default=env("LIFEBOAT_PS_LISTEN", "0.0.0.0"),
                            help="The local address it listens on (LIFEBOAT_PS_LISTEN).")
        parser.add_argument("--site", default=env("LIFEBOAT_PS_SITE", Site.PRIMARY), choices=list(Site.values))
        parser.add_argument("--once", action="store_true",
                            help="Register and write the configuration, print its path, but do not start.")

    def handle(self, *args, **options):
        state_dir = os.path.abspath(options["state_dir"])
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        host = options["host"] or _this_host_address()
        server = self._register(state_dir=state_dir, vault_name=options["vault"], host=host, port=options["port"],
                                site=options["site"])
        config = process_server_config(server=server, cache_dir=os.path.join(state_dir, "cache"))
        config["listen"] = f"{options['listen']}:{options['port']}"
        path = os.path.join(state_dir, "process-server.json")
        replace_durably(path, json.dumps(config).encode(), mode=0o600)
        self.stdout.write(f"process server {server.name} (id {server.pk}) of vault {server.vault.name}: "
                          f"https://{host}:{options['port']}, configuration {path}")
        if options["once"]:
            return
        self.stdout.flush()
        connections.close_all()
        os.execv(sys.executable, [sys.executable, "-m", "replication.dataplane.process_server", "--config", path])

    def _register(self, *, state_dir: str, vault_name: str, host: str, port: int, site: str) -> ProcessServer:
        """This process server's row, with the address given; waits for the database and the
        vault (saying so every minute)."""
        said_at = 0.0
        while True:
            try:
                vault, waiting = self._vault(vault_name)
                if vault is not None:
                    return self._identity(state_dir=state_dir, vault=vault, host=host, port=port, site=site)
            except DatabaseError as e:  # not migrated yet, or not up yet
                waiting = f"the database does not answer yet ({str(e).strip().splitlines()[0]})"
                connections.close_all()
            if time.monotonic() - said_at >= 60:
                self.stderr.write(f"Waiting for {waiting}; trying again every {RETRY_SECONDS} s.")
                said_at = time.monotonic()
            time.sleep(RETRY_SECONDS)

    def _vault(self, name: str) -> tuple[Vault | None, str]:
        if name:
            vault = Vault.objects.filter(name=name).first()
            return vault, f"the vault {name!r} (create it in the portal at {settings.LIFEBOAT_PORTAL_URL})"
        vaults = list(Vault.objects.all()[:2])
        if len(vaults) == 1:
            return vaults[0], ""
        if not vaults:
            return None, f"a vault to serve (create one in the portal at {settings.LIFEBOAT_PORTAL_URL})"
        raise CommandError("There are several vaults: name the one this process server serves with --vault "
                           "(or LIFEBOAT_PS_VAULT).")

    def _identity(self, *, state_dir: str, vault: Vault, host: str, port: int, site: str) -> ProcessServer:
        """The row this state directory belongs to (made on the first start), with its address
        brought up to date."""
        path = os.path.join(state_dir, IDENTITY_FILE)
        try:
            with open(path) as f:
                known = json.load(f)
        except FileNotFoundError:
            known = {}
        server = ProcessServer.objects.filter(pk=known.get("id"), vault=vault).first() if known.get("id") else None
        name = known.get("name") or f"ps-{socket.gethostname()}"[:120]
        if server is None:
            # A host that ran one before (its state directory lost) takes its row again.
            server = ProcessServer.objects.filter(vault=vault, name=name).first()
        if server is None:
            server = process_server_create(vault=vault, name=name, host=host, data_port=port, site=site)
            logger.info("registered process server %s (id %s) with vault %s", name, server.pk, vault.name)
        elif (server.host, server.data_port) != (host, port):
            ProcessServer.objects.filter(pk=server.pk).update(host=host, data_port=port)
            server.host, server.data_port = host, port
        replace_durably(path, json.dumps({"id": server.pk, "name": server.name, "vault": vault.name}).encode(),
                        mode=0o600)
        return server
