"""The process server's own Prometheus metrics: ``GET /metrics`` on a listener of its own.

Plain HTTP, no token, on ``metrics_listen`` (default ``127.0.0.1`` and a port the system
picks, written to ``server.json`` as ``metrics_port``; a fixed ``HOST:PORT`` in the config for
a scraper; empty: no endpoint). It is not on the data port: that one is HTTPS with tokens for
agents, and a scraper should need neither. What it serves is counters and gauges only,
nothing an agent could use: no item token, key, item name or cached byte, and no per-item
series (the vault's /metrics has those). Bound to the loopback address by default, it is
read by a scraper on the same host or through an SSH tunnel; binding it elsewhere is the
administrator's choice, made in the config.

Values are read from the server at scrape time (a collector, not instrumented objects), so
nothing is counted twice and the ingest path takes no extra lock. If the port cannot be
bound the server logs it and runs without the endpoint: replication matters more.
"""
from __future__ import annotations

import logging
import shutil
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from replication.dataplane.process_server.server import ProcessServer

log = logging.getLogger("lifeboat.process_server")

PREFIX = "lifeboat_process_server"


class ProcessServerCollector(Collector):
    """The server's counters and gauges, read under its lock at each scrape."""

    def __init__(self, ps: ProcessServer) -> None:
        self.ps = ps

    def collect(self) -> Iterator[Metric]:
        ps = self.ps
        with ps.lock:
            received_bytes, received_batches = ps.received_bytes, ps.received_batches
            uploaded_bytes, uploaded_batches = ps.uploaded_bytes, ps.uploaded_batches
            refusals = dict(ps.refusals)
            pending_bytes = ps.pending_bytes
            pending_batches = sum(len(i.pending) for i in ps.items.values())
            items = sum(1 for i in ps.items.values() if i.floor_checked)
            receiving = ps.reserved_bytes
            sealing = ps.sealing_bytes
        guard = ps.httpd.guard if ps.httpd is not None else None

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield counter("received_bytes", "Batch bytes received from agents and acknowledged.", received_bytes)
        yield counter("received_batches", "Batches received from agents and acknowledged.", received_batches)
        refused = CounterMetricFamily(f"{PREFIX}_refused_requests", "Requests answered with an error, by error code.",
                                      labels=["code"])
        for code, n in sorted(refusals.items()):
            refused.add_metric([code], n)
        yield refused
        yield counter("uploaded_bytes", "Sealed bytes put into cache storage.", uploaded_bytes)
        yield counter("uploaded_batches", "Batches put into cache storage.", uploaded_batches)
        yield counter("upload_errors", "Failed attempts to put a batch into cache storage (each is retried).",
                      ps.upload_errors)
        yield counter("wakeups_sent", "POSTs telling the vault which items have new logs in storage.", ps.wakeups_sent)
        yield counter("wakeup_errors", "Such POSTs that failed (the vault's apply sweep finds those logs).",
                      ps.wakeup_errors)
        yield gauge("cache_pending_bytes", "Sealed bytes acknowledged and cached, not yet uploaded.", pending_bytes)
        yield gauge("cache_pending_batches", "Batches acknowledged and cached, not yet uploaded.", pending_batches)
        yield gauge("cache_limit_bytes", "The most the cache may hold (max_cache_bytes).", ps.config.max_cache_bytes)
        try:
            yield gauge("cache_disk_free_bytes", "Free bytes on the cache's file system.",
                        shutil.disk_usage(ps.cache_dir).free)
        except OSError:
            pass  # the cache directory vanished: the server makes it again at the next batch
        yield gauge("receiving_bytes", "Bytes of batch bodies being received now.", receiving)
        yield gauge("sealing_memory_bytes", "Memory held by batches being received and sealed now.", sealing)
        yield gauge("items", "Items whose stream this server holds a place in.", items)
        if guard is not None:
            yield gauge("connections_open", "Agent connections open now.", guard.open_connections())
            yield counter("slow_connections_cut", "Connections cut for being too slow or idle.", guard.cut)
            yield counter("connections_refused", "Connections closed because their address held its share.",
                          guard.refused)
        yield gauge("start_time_seconds", "When the server started (Unix time).", ps.started_at)


def start_metrics(ps: ProcessServer):
    """Serve ``/metrics`` on ``ps.config.metrics_listen``; the HTTP server (``shutdown``,
    ``server_close``, ``server_address``), or None when not configured or not possible."""
    where = ps.config.metrics_listen
    if where is None:
        return None
    registry = CollectorRegistry()
    registry.register(ProcessServerCollector(ps))
    try:
        httpd, _thread = start_http_server(where[1], addr=where[0], registry=registry)
    except OSError as e:
        log.error("cannot serve metrics on %s:%d (%s): the process server runs without its metrics endpoint; "
                  "choose another 'metrics_listen' in its config", where[0], where[1], e)
        return None
    log.info("metrics on http://%s:%d/metrics", where[0], httpd.server_address[1])
    return httpd
