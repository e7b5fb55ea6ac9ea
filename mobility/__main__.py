"""Command line of the mobility agent.

    python -m mobility register --config-url URL --passphrase-file FILE|- [--instance-uuid U] --disk KEY=PATH ...
    python -m mobility run      [--once]
    python -m mobility bookmark --item ITEM_ID [--label LABEL]
    python -m mobility resync   --item ITEM_ID
    python -m mobility status

Every command takes ``--state-dir`` (default ``$LIFEBOAT_AGENT_STATE_DIR`` or
/var/lib/lifeboat-agent). ``register`` keeps the configuration server's address, the
machine description and the credentials there (0600); the other commands read them from
there. ``bookmark`` and ``resync`` leave a request in the state directory that the running
agent takes on its next pass.

The vault passphrase is read from a file (``--passphrase-file FILE``, readable only by its
owner) or from standard input (``--passphrase-file -``), never from the command line, where
other users see it in the process list and the shell keeps it in its history.
``register`` for a machine that has an agent already (without that agent's credentials in
the state directory) ends with exit code 3: the registration waits for an administrator's
approval in the portal, and ``run`` takes the credentials once it is approved.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import socket
import sys
import threading

from mobility.agent import Agent, AgentError, RegistrationPending, guest_freeze, write_request
from mobility.jsonfile import read_json, write_json
from mobility.transport import TransportError
from mobility.tuning import tune_allocator

DEFAULT_STATE_DIR = os.environ.get("LIFEBOAT_AGENT_STATE_DIR", "/var/lib/lifeboat-agent")
EXIT_PENDING = 3  # registered, waiting for an administrator's approval
PASSPHRASE_REFUSED = (
    "--passphrase on the command line is refused: other users can read it in the process list and it stays in "
    "the shell history. Put the vault passphrase in a file only you can read and give --passphrase-file FILE, "
    "or pipe it in with --passphrase-file -"
)


def _passphrase(path: str) -> str:
    """The vault passphrase from a file, or from standard input for ``-`` (its first line)."""
    if path == "-":
        text = sys.stdin.readline()
        where = "standard input"
    else:
        with open(path) as f:
            text = f.read()
        where = path
    passphrase = text.strip()
    if not passphrase:
        raise AgentError(f"{where} holds no passphrase")
    return passphrase


def _disk_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _machine(args: argparse.Namespace) -> dict:
    if args.machine_file:
        with open(args.machine_file) as f:
            return json.load(f)
    if not args.disk:
        raise AgentError("give the disks to protect with --disk KEY=PATH (or --machine-file)")
    disks = []
    for spec in args.disk:
        key, sep, path = spec.partition("=")
        if not sep or not key.strip().isdigit() or not path:
            raise AgentError(f"--disk {spec!r}: expected KEY=PATH with a numeric key")
        disks.append({"key": int(key), "path": os.path.abspath(path), "capacity_bytes": _disk_size(path)})
    machine = {"name": args.name or socket.gethostname(), "os": args.os or platform.platform(), "disks": disks}
    if args.instance_uuid:
        machine["instance_uuid"] = args.instance_uuid
    return machine


def _agent(state_dir: str) -> Agent:
    settings = read_json(os.path.join(state_dir, "agent.json"))
    if not settings:
        raise AgentError(f"{state_dir} holds no agent.json: run 'python -m mobility register' first")
    return Agent(state_dir=state_dir, config_url=settings["config_url"], hostname=settings.get("hostname"),
                 config_ca_file=settings.get("config_ca_file"), config_thumbprint=settings.get("config_thumbprint"),
                 auto_resync=settings.get("auto_resync", False), snapshot_command=settings.get("snapshot_command"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobility", description="Lifeboat mobility agent")
    parser.add_argument("--log-level", default=os.environ.get("LIFEBOAT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
        return p

    reg = command("register", "register this machine with the configuration server")
    reg.add_argument("--config-url", required=True)
    reg.add_argument("--passphrase-file", metavar="FILE",
                     help="a file holding the vault's registration passphrase, or - to read it from standard input")
    reg.add_argument("--passphrase", help=argparse.SUPPRESS)  # refused with a sentence (PASSPHRASE_REFUSED)
    reg.add_argument("--disk", action="append", metavar="KEY=PATH", help="a disk to protect (repeat for each)")
    reg.add_argument("--machine-file", help='JSON instead of --disk: {"name", "os", "disks": [{"key", "path", '
                                            '"capacity_bytes"}]}')
    reg.add_argument("--instance-uuid", help="the VM's vCenter instance UUID, when it is a discovered VM")
    reg.add_argument("--name", help="machine name (default: the host name)")
    reg.add_argument("--os", help="operating system (default: this one)")
    reg.add_argument("--hostname")
    reg.add_argument("--config-ca-file", help="CA bundle for an https configuration server")
    reg.add_argument("--config-thumbprint", help="pin the configuration server's certificate instead")
    reg.add_argument("--auto-resync", action="store_true", help="resynchronize without waiting to be told")
    reg.add_argument("--snapshot-command", help="scan the disks through frozen views: 'CMD create DISK...' prints a "
                                                "view path per disk (e.g. LVM snapshots), 'CMD remove VIEW...' drops "
                                                "them; without it scanned points are not crash-consistent")
    run = command("run", "replicate the assigned items")
    run.add_argument("--once", action="store_true", help="one pass, then exit")
    for name in ("bookmark", "resync"):
        p = command(name, f"ask the running agent for a {name}")
        p.add_argument("--item", required=True)
        if name == "bookmark":
            p.add_argument("--label", default="")
    freeze = command("freeze", "the guest's freeze hook: bookmark every item at this quiesced moment "
                               "(run it from VMware Tools' freeze script)")
    freeze.add_argument("--label", default="")
    command("status", "print the items' replication status")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "register":
            if args.passphrase is not None:
                print(f"error: {PASSPHRASE_REFUSED}", file=sys.stderr)
                return 2
            if not args.passphrase_file:
                raise AgentError("give the vault passphrase with --passphrase-file FILE (or --passphrase-file - to "
                                 "read it from standard input)")
            passphrase = _passphrase(args.passphrase_file)
            machine = _machine(args)
            os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
            write_json(os.path.join(args.state_dir, "agent.json"), {
                "config_url": args.config_url, "hostname": args.hostname, "config_ca_file": args.config_ca_file,
                "config_thumbprint": args.config_thumbprint, "auto_resync": args.auto_resync, "machine": machine,
                "snapshot_command": args.snapshot_command,
            })
            agent = Agent(state_dir=args.state_dir, config_url=args.config_url, passphrase=passphrase,
                          machine=machine, hostname=args.hostname, config_ca_file=args.config_ca_file,
                          config_thumbprint=args.config_thumbprint)
            print(agent.register())
        elif args.command == "run":
            tune_allocator()
            agent = _agent(args.state_dir)
            if args.once:
                print(json.dumps(agent.run_once(), indent=2))
            else:
                stop = threading.Event()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, lambda *_: stop.set())
                agent.run_forever(stop)
            agent.close()
        elif args.command in ("bookmark", "resync"):
            print(write_request(args.state_dir, args.command, args.item, getattr(args, "label", "")))
        elif args.command == "freeze":
            for path in guest_freeze(args.state_dir, label=args.label):
                print(path)
        elif args.command == "status":
            print(json.dumps(_agent(args.state_dir).status(), indent=2))
    except RegistrationPending as e:
        print(str(e), file=sys.stderr)
        return EXIT_PENDING
    except (AgentError, TransportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
