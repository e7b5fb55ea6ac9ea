"""``GET /metrics``: Lifeboat's state for Prometheus, read from the database at scrape time.

One collector (``LifeboatCollector``) runs a fixed handful of queries per scrape whatever the
number of items, servers or jobs (pinned by a test): items with their RPO, health, protection
state and data path; process servers with their figures and rates; jobs counted by type and
state, and the durations of finished jobs as a histogram. Nothing is kept in the web
process, so every gunicorn worker answers the same.

Access: with ``LIFEBOAT_METRICS_TOKEN`` set, a scraper sends ``Authorization: Bearer
<token>`` (from any address); without it, only clients on this host (loopback) are answered,
so a fresh installation exposes nothing. The page names items and vaults, never a secret.

The process server serves its own counters on a listener of its own
(``replication/dataplane/process_server/metrics.py``).
"""
from __future__ import annotations

import hmac
import ipaddress
from collections import Counter as Tally
from collections.abc import Iterator
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.http import HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from core.choices import JobState
from core.models import Job
from replication.choices import ProtectionState
from replication.data_path import process_server_rates
from replication.models import ProtectedItem
from vault.choices import Health
from vault.models import ProcessServer

# Upper bounds (seconds) of the job-duration histogram's buckets: from a quick disable to
# an initial copy of hours.
JOB_DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

STAGES = ("agent", "process_server", "cache_storage")


def _seconds(value) -> float:
    """A summed duration as the database gives it (a timedelta; microseconds on SQLite)."""
    if value is None:
        return 0.0
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value) / 1e6


class LifeboatCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from self._items()
        yield from self._process_servers()
        yield from self._jobs()

    # -- items (one query)

    def _items(self) -> Iterator[Metric]:
        labels = ["vault", "item", "name", "direction"]
        rpo = GaugeMetricFamily("lifeboat_item_rpo_seconds",
                                "Age of the item's newest recovery point (its RPO), as the monitor last measured it.",
                                labels=labels)
        backlog = GaugeMetricFamily(
            "lifeboat_item_backlog_bytes",
            "Bytes of the item waiting at each data-path stage: agent (changed, not acknowledged), process_server "
            "(sealed, cached, not uploaded), cache_storage (sealed logs not yet applied).", labels=labels + ["stage"])
        rate = GaugeMetricFamily(
            "lifeboat_item_data_path_bytes_per_second",
            "Bytes per second leaving each stage over the last minutes: agent (sent), process_server (uploaded), "
            "cache_storage (applied).", labels=labels + ["stage"])
        lag = GaugeMetricFamily("lifeboat_item_apply_lag_batches",
                                "Batches the process server acknowledged that the replica has not applied yet.",
                                labels=labels)
        lag_bytes = GaugeMetricFamily(
            "lifeboat_item_apply_lag_bytes",
            "Sealed bytes acknowledged by the process server and not yet applied (its cache and cache storage).",
            labels=labels)
        totals = GaugeMetricFamily("lifeboat_backlog_bytes", "Bytes waiting at each data-path stage, all items of a vault.",
                                   labels=["vault", "stage"])
        by_health = GaugeMetricFamily("lifeboat_items_by_health", "Protected items per health.", labels=["vault", "health"])
        by_state = GaugeMetricFamily("lifeboat_items_by_protection_state", "Protected items per protection state.",
                                     labels=["vault", "state"])
        health_count: Tally = Tally()
        state_count: Tally = Tally()
        stage_total: Tally = Tally()
        vaults: set[str] = set()
        rows = ProtectedItem.objects.order_by("vault__name", "name").values_list(
            "vault__name", "id", "name", "direction", "rpo_seconds", "health", "protection_state",
            "agent_backlog_bytes", "ps_pending_bytes", "storage_waiting_bytes", "acked_seq", "applied_seq",
            "sent_bytes_per_s", "uploaded_bytes_per_s", "applied_bytes_per_s")
        for (vault, pk, name, direction, rpo_s, health, state, agent_b, ps_b, storage_b, acked, applied,
             sent_r, uploaded_r, applied_r) in rows:
            item = [vault, str(pk), name, direction]
            vaults.add(vault)
            health_count[vault, health] += 1
            state_count[vault, state] += 1
            if rpo_s is not None:
                rpo.add_metric(item, rpo_s)
            for stage, waiting, speed in zip(STAGES, (agent_b, ps_b, storage_b), (sent_r, uploaded_r, applied_r)):
                backlog.add_metric(item + [stage], waiting)
                stage_total[vault, stage] += waiting
                if speed is not None:
                    rate.add_metric(item + [stage], speed)
            lag.add_metric(item, max(0, acked - applied))
            lag_bytes.add_metric(item, ps_b + storage_b)
        for vault in sorted(vaults):
            for health in Health.values:
                by_health.add_metric([vault, health], health_count[vault, health])
            for state in ProtectionState.values:
                by_state.add_metric([vault, state], state_count[vault, state])
            for stage in STAGES:
                totals.add_metric([vault, stage], stage_total[vault, stage])
        yield from (rpo, backlog, rate, lag, lag_bytes, totals, by_health, by_state)

    # -- process servers (two queries)

    def _process_servers(self) -> Iterator[Metric]:
        labels = ["vault", "server"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"lifeboat_process_server_{name}", doc, labels=labels)

        ingest = gauge("ingest_bytes_per_second", "Batch bytes per second received from agents over the last minutes.")
        upload = gauge("upload_bytes_per_second", "Sealed bytes per second uploaded to cache storage over the last minutes.")
        pending = gauge("pending_upload_bytes", "Sealed bytes cached and not yet uploaded, as last reported.")
        free = gauge("cache_free_bytes", "Cache bytes still free, as last reported.")
        total = gauge("cache_total_bytes", "Cache size, as last reported.")
        cpu = gauge("cpu_percent", "Host CPU use, as last reported.")
        memory = gauge("memory_percent", "Host memory use, as last reported.")
        seen = gauge("last_heartbeat_timestamp_seconds", "When the server last reported (Unix time).")
        healthy = gauge("healthy", "1 when the monitor finds the server healthy, else 0.")
        rates = process_server_rates()
        for pk, vault, name, pending_b, free_b, total_b, cpu_p, mem_p, heartbeat, health in (
                ProcessServer.objects.order_by("vault__name", "name").values_list(
                    "pk", "vault__name", "name", "pending_upload_bytes", "cache_free_bytes", "cache_total_bytes",
                    "cpu_percent", "memory_percent", "last_heartbeat_at", "health")):
            server = [vault, name]
            ingest_r, upload_r = rates.get(pk, (None, None))
            for family, value in ((ingest, ingest_r), (upload, upload_r), (pending, pending_b), (free, free_b),
                                  (total, total_b), (cpu, cpu_p), (memory, mem_p),
                                  (seen, heartbeat.timestamp() if heartbeat else None)):
                if value is not None:
                    family.add_metric(server, value)
            healthy.add_metric(server, 1 if health == Health.HEALTHY else 0)
        yield from (ingest, upload, pending, free, total, cpu, memory, seen, healthy)

    # -- jobs (two queries)

    def _jobs(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("lifeboat_jobs", "Jobs by type and state.", labels=["type", "state"])
        for row in Job.objects.order_by().values("type", "state").annotate(n=Count("id")).order_by("type", "state"):
            jobs.add_metric([row["type"], row["state"]], row["n"])
        yield jobs
        durations = HistogramMetricFamily(
            "lifeboat_job_duration_seconds", "How long finished jobs ran, from their start to their end (waits included).",
            labels=["type", "state"])
        buckets = {f"le_{i}": Count("id", filter=Q(duration__lte=timedelta(seconds=b)))
                   for i, b in enumerate(JOB_DURATION_BUCKETS)}
        finished = (Job.objects.filter(state__in=JobState.TERMINAL, started_at__isnull=False, ended_at__isnull=False)
                    .alias(duration=ExpressionWrapper(F("ended_at") - F("started_at"), output_field=DurationField()))
                    .order_by().values("type", "state")
                    .annotate(n=Count("id"), total=Sum("duration"), **buckets).order_by("type", "state"))
        for row in finished:
            counts = [(str(float(b)), row[f"le_{i}"]) for i, b in enumerate(JOB_DURATION_BUCKETS)]
            durations.add_metric([row["type"], row["state"]], counts + [("+Inf", row["n"])], _seconds(row["total"]))
        yield durations


REGISTRY = CollectorRegistry()
REGISTRY.register(LifeboatCollector())


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _refused(status: int, message: str, **headers: str) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")
    for name, value in headers.items():
        response[name] = value
    return response


@require_GET
def metrics_view(request):
    """The metrics in the format the scraper asks for (Prometheus text or OpenMetrics)."""
    token = settings.LIFEBOAT_METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return _refused(401, "The metrics need 'Authorization: Bearer <LIFEBOAT_METRICS_TOKEN>'.",
                            **{"WWW-Authenticate": 'Bearer realm="lifeboat-metrics"'})
    elif not _is_loopback(request.META.get("REMOTE_ADDR", "")):
        return _refused(403, "The metrics are answered only to this host while LIFEBOAT_METRICS_TOKEN is not set; "
                             "set it and give the scraper the token.")
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = HttpResponse(encoder(REGISTRY), content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
