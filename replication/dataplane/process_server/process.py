"""Running a process server: in this process (``serve``, ``main``: ``python -m
replication.dataplane.process_server --config FILE``) or as a child process (``spawn``, for
workers, tests and the benchmarks)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

from mobility.durable import replace_durably, unlink_quietly
from mobility.logs import configure_logging, json_logs_wanted
from mobility.tuning import tune_allocator
from replication.dataplane.process_server.config import (
    VERSION,
    ConfigError,
    ServerConfig,
    ensure_certificate,
    load_config,
)
from replication.dataplane.process_server.server import ProcessServer

# The directory that holds the ``replication`` package (the child's working directory).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class ProcessServerProcess:
    """A process server running as its own process (``spawn``); for workers, tests and the
    benchmark. ``url``/``thumbprint``/``port`` are known once it answers."""

    def __init__(self, config_path: str, cache_dir: str, popen) -> None:
        self.config_path = config_path
        self.cache_dir = cache_dir
        self.popen = popen
        self.port = 0
        self.host = "127.0.0.1"
        self.thumbprint = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> "ProcessServerProcess":
        deadline = time.monotonic() + timeout
        info_path = os.path.join(self.cache_dir, "server.json")
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"process server exited with code {self.popen.returncode} while starting")
            try:
                with open(info_path) as f:
                    info = json.load(f)
            except (FileNotFoundError, ValueError):
                info = {}
            if info.get("pid") == self.popen.pid:
                self.port, self.host, self.thumbprint = info["port"], info["host"], info["thumbprint"]
                return self
            time.sleep(0.02)
        raise TimeoutError(f"process server did not start within {timeout:.0f}s")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a crash."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except Exception:
                self.kill()


def spawn(config: dict, *, config_path: str, log_path: str | None = None, ready_timeout: float = 30.0,
          env: dict | None = None) -> ProcessServerProcess:
    """Write ``config`` to ``config_path`` and start ``python -m
    replication.dataplane.process_server`` on it; returns once it listens."""
    cfg = ServerConfig.from_dict(config)  # refuse a bad config here, with its message
    replace_durably(config_path, json.dumps(config).encode(), mode=0o600)
    unlink_quietly(os.path.join(cfg.cache_dir, "server.json"))
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, child_env.get("PYTHONPATH")]))
    popen = subprocess.Popen([sys.executable, "-m", "replication.dataplane.process_server", "--config", config_path],
                             stdout=out, stderr=subprocess.STDOUT, env=child_env, cwd=ROOT)
    if log_path:
        out.close()
    return ProcessServerProcess(config_path, cfg.cache_dir, popen).wait_ready(ready_timeout)


def serve(config: ServerConfig) -> None:
    """Run a process server in this process until SIGTERM or SIGINT."""
    tune_allocator()
    server = ProcessServer(config).start()
    if not json_logs_wanted():  # JSON lines only: the start is logged (server.start) with the same facts
        print(f"lifeboat process server {VERSION} listening on {server.url}", flush=True)
        print(f"thumbprint: {server.thumbprint}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.dataplane.process_server",
                                     description="Lifeboat process server: HTTPS ingest of replication batches.")
    parser.add_argument("--config", required=True, help="JSON config file")
    parser.add_argument("--print-thumbprint", action="store_true",
                        help="make the certificate if needed, print its SHA-256 thumbprint and exit")
    parser.add_argument("--log-level", default=os.environ.get("LIFEBOAT_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    try:  # plain, or one JSON object a line with LIFEBOAT_LOG_FORMAT=json (mobility/logs.py)
        configure_logging(args.log_level)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_thumbprint:
        print(ensure_certificate(os.path.join(config.cache_dir, "tls"), host=config.host)[2])
        return 0
    try:
        serve(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot start the process server: {e}", file=sys.stderr)
        return 1
    return 0

