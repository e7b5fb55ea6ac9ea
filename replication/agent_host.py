"""Runs the mobility agents of the simulated VMware site (its "push install").

When replication of a simulated VM is enabled, Lifeboat writes the agent's credentials to
``<site>/agents/<vm uuid>/credentials.json``; this host notices, and runs that agent (the
same ``mobility.agent.Agent`` a real VM runs) in a thread of its own. Django-free.

    python -m replication.agent_host --site-dir DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading

from mobility.agent import Agent

log = logging.getLogger("lifeboat.agent_host")


class AgentHost:
    def __init__(self, site_dir: str, *, scan_interval: float = 2.0, **agent_options) -> None:
        self.agents_dir = os.path.join(site_dir, "agents")
        self.scan_interval = scan_interval
        self.agent_options = agent_options
        self.stop = threading.Event()
        self.threads: dict[str, threading.Thread] = {}

    def scan(self) -> None:
        try:
            names = sorted(os.listdir(self.agents_dir))
        except FileNotFoundError:
            return
        for name in names:
            state_dir = os.path.join(self.agents_dir, name)
            if name in self.threads or not os.path.exists(os.path.join(state_dir, "credentials.json")):
                continue
            thread = threading.Thread(target=self._run, args=(state_dir,), name=f"agent-{name[:8]}", daemon=True)
            self.threads[name] = thread
            thread.start()
            log.info("started the agent of VM %s", name)

    def _run(self, state_dir: str) -> None:
        with open(os.path.join(state_dir, "credentials.json")) as f:
            config_url = json.load(f).get("config_url")
        agent = Agent(state_dir=state_dir, config_url=config_url, **self.agent_options)
        while not self.stop.is_set():
            try:
                agent.run_forever(self.stop)
            except Exception:  # noqa: BLE001 - an agent keeps running whatever one pass met
                log.exception("agent in %s stopped; restarting it", state_dir)
                self.stop.wait(5)

    def run(self) -> None:
        while not self.stop.is_set():
            self.scan()
            self.stop.wait(self.scan_interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.agent_host", description=__doc__.split("\n")[0])
    parser.add_argument("--site-dir", required=True)
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    parser.add_argument("--log-level", default=os.environ.get("LIFEBOAT_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = AgentHost(args.site_dir, heartbeat_interval=args.heartbeat_interval, assignment_interval=5.0)
    signal.signal(signal.SIGTERM, lambda *_: host.stop.set())
    try:
        host.run()
    except KeyboardInterrupt:
        host.stop.set()
    for t in host.threads.values():
        t.join(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
