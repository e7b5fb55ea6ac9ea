"""The data path of each item in bytes and rates: what each stage holds and how fast it drains.

Stages, and where their figures come from:

- **Mobility agent**: ``agent_backlog_bytes`` (its heartbeat), changed bytes not yet
  acknowledged by the process server; it drains at ``sent_bytes_per_s``, the batch bytes the
  process server received and acknowledged for the item.
- **Process server**: ``ps_pending_bytes``, sealed (compressed, encrypted) bytes acknowledged
  and cached but not yet uploaded; drains at ``uploaded_bytes_per_s``.
- **Cache storage**: ``storage_waiting_bytes``, the sealed logs left in storage after the
  last apply pass (apply deletes what it applied; ``storage_measured_at`` says when);
  drains at ``applied_bytes_per_s``, sealed log bytes applied.
- **Replica disks**: applied through ``applied_seq``.

Rates come from successive process-server heartbeats (``process_server_data_path_record``).
A heartbeat carries the server's counters since it started, in total and per item (batch
bytes received, sealed bytes uploaded) and when it started; each is kept as a
``DataPathSample`` for twice the rate window (``LIFEBOAT_DATA_PATH_RATE_WINDOW``, 300 s)
together with the item's ``applied_log_bytes`` counter at that moment. A rate is the increase
over the samples of the window divided by the time they span; a counter that went back (the
server restarted: another start time) counts from 0 again, as Prometheus' ``rate()`` does.
The item's rates are written on its row at every heartbeat, so pages, the API and /metrics
read them without looking at samples.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from replication.models import DataPathSample, ProtectedItem
from vault.models import ProcessServer

# A heartbeat closer than this to the server's previous sample adds no sample (a rate needs
# time between its samples; a fast reporting interval does not fill the table).
SAMPLE_SPACING_SECONDS = 2.0


def rate_window() -> timedelta:
    return timedelta(seconds=max(10, int(getattr(settings, "LIFEBOAT_DATA_PATH_RATE_WINDOW", 300))))


def counter_rate(points: Sequence[tuple[float, float, int]]) -> float | None:
    """Bytes per second from counter samples ``(time, start, value)``, oldest first: the
    increase between successive samples (a new ``start`` or a lower value means the counter
    began again from 0, so the new value is all increase) over the time they span. None with
    fewer than two samples."""
    if len(points) < 2:
        return None
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return None
    increase = 0
    for (_, start0, v0), (_, start1, v1) in zip(points, points[1:]):
        increase += v1 - v0 if start1 == start0 and v1 >= v0 else v1
    return increase / span


def _in_window(points: list, since: float) -> list:
    """The points of the window; the last two known when the window holds fewer (a server
    that reports less often than the window still gets a rate)."""
    recent = [p for p in points if p[0] >= since]
    return recent if len(recent) >= 2 else points[-2:]


def _counter(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def process_server_data_path_record(*, server: ProcessServer, report: dict, now: datetime | None = None) -> None:
    """Keep what a process server's heartbeat says of each item's data path: the sealed bytes
    it still holds, how far it uploaded, and (from its counters, sampled) the rates the item's
    data was received, uploaded and applied at over the last minutes. A constant number of
    queries whatever the number of items."""
    now = now or timezone.now()
    figures = {}
    for item_id, f in (report.get("items") or {}).items():
        if isinstance(f, dict):
            figures[str(item_id)] = f
    started = report.get("started_at")
    counting = isinstance(started, (int, float)) and not isinstance(started, bool)
    window = rate_window()
    horizon = now - 2 * window
    items = list(ProtectedItem.objects.filter(pk__in=list(figures), process_server=server)
                 .only("pk", "applied_log_bytes", "ps_pending_bytes", "uploaded_seq"))
    earlier = list(DataPathSample.objects.filter(server=server, at__gte=horizon).order_by("at").values_list(
        "item_id", "at", "started_at", "received_bytes", "uploaded_bytes", "applied_log_bytes"))
    new: list[DataPathSample] = []
    if counting:
        total_received, total_uploaded = _counter(report.get("received_bytes")), _counter(report.get("uploaded_bytes"))
        if total_received is not None and total_uploaded is not None:
            new.append(DataPathSample(server=server, item=None, at=now, started_at=float(started),
                                      received_bytes=total_received, uploaded_bytes=total_uploaded))
        for item in items:
            f = figures[str(item.pk)]
            received, uploaded = _counter(f.get("received_bytes")), _counter(f.get("uploaded_bytes"))
            if received is not None and uploaded is not None:
                new.append(DataPathSample(server=server, item=item, at=now, started_at=float(started),
                                          received_bytes=received, uploaded_bytes=uploaded,
                                          applied_log_bytes=item.applied_log_bytes))
    by_item: dict = defaultdict(list)
    for row in earlier:
        by_item[row[0]].append(row[1:])
    for sample in new:
        by_item[sample.item_id].append((sample.at, sample.started_at, sample.received_bytes, sample.uploaded_bytes,
                                        sample.applied_log_bytes))
    since = (now - window).timestamp()
    totals = by_item.get(None, [])
    for item in items:
        f = figures[str(item.pk)]
        pending, uploaded_seq = _counter(f.get("pending_bytes")), _counter(f.get("uploaded_seq"))
        if pending is not None:
            item.ps_pending_bytes = pending
        if uploaded_seq is not None:
            item.uploaded_seq = uploaded_seq
        rows = [(at.timestamp(), start, rec, up, applied) for at, start, rec, up, applied in by_item.get(item.pk, [])]
        if rows:
            # A server reports an item once it received something for it: at its previous
            # report since the same start the item's counters were 0 (its first batches count).
            before = [t for t in totals if t[0].timestamp() < rows[0][0] and t[1] == rows[0][1]]
            if before:
                rows.insert(0, (before[-1][0].timestamp(), rows[0][1], 0, 0, None))
        item.sent_bytes_per_s = counter_rate(_in_window([(t, s, r) for t, s, r, _, _ in rows], since))
        item.uploaded_bytes_per_s = counter_rate(_in_window([(t, s, u) for t, s, _, u, _ in rows], since))
        applied = [(t, 0.0, a) for t, _, _, _, a in rows if a is not None]
        item.applied_bytes_per_s = counter_rate(_in_window(applied, since))
        item.data_path_measured_at = now
    if items:
        ProtectedItem.objects.bulk_update(items, ["ps_pending_bytes", "uploaded_seq", "sent_bytes_per_s",
                                                  "uploaded_bytes_per_s", "applied_bytes_per_s", "data_path_measured_at"])
    newest = max((row[1] for row in earlier if row[0] is None), default=None)
    if new and (newest is None or (now - newest).total_seconds() >= SAMPLE_SPACING_SECONDS):
        try:
            # Its own transaction (no savepoint: the figures above are written already), so
            # that an item deleted meanwhile fails it at its commit, here.
            with transaction.atomic(savepoint=False):
                DataPathSample.objects.bulk_create(new)
        except IntegrityError:  # an item deleted meanwhile (replication.services.protected_item_delete)
            alive = set(ProtectedItem.objects.filter(pk__in=[s.item_id for s in new if s.item_id]).values_list("pk", flat=True))
            DataPathSample.objects.bulk_create([s for s in new if s.item_id is None or s.item_id in alive])
    DataPathSample.objects.filter(server=server, at__lt=horizon).delete()


def process_server_rates(*, now: datetime | None = None) -> dict[int, tuple[float | None, float | None]]:
    """Per process server id: (ingest, upload) bytes/s over the rate window, from its
    heartbeats' totals. One query."""
    now = now or timezone.now()
    window = rate_window()
    points: dict[int, list] = defaultdict(list)
    for server_id, at, started, received, uploaded in DataPathSample.objects.filter(
            item__isnull=True, at__gte=now - 2 * window).order_by("at").values_list(
            "server_id", "at", "started_at", "received_bytes", "uploaded_bytes"):
        points[server_id].append((at.timestamp(), started, received, uploaded))
    since = (now - window).timestamp()
    return {
        server_id: (counter_rate(_in_window([(t, s, r) for t, s, r, _ in rows], since)),
                    counter_rate(_in_window([(t, s, u) for t, s, _, u in rows], since)))
        for server_id, rows in points.items()
    }


def item_data_path(*, item: ProtectedItem) -> list[dict]:
    """The item's stages for its page, in the data's order: what waits, how fast it drains,
    as of when."""
    return [
        {"stage": "agent", "name": "Mobility agent", "waiting_bytes": item.agent_backlog_bytes,
         "what": "changed, not yet acknowledged by the process server", "rate": item.sent_bytes_per_s,
         "rate_what": "sent", "measured_at": item.agent_last_heartbeat_at, "batches": None},
        {"stage": "process_server", "name": f"Process server {item.process_server.name}",
         "waiting_bytes": item.ps_pending_bytes, "what": "sealed in its cache, not yet uploaded",
         "rate": item.uploaded_bytes_per_s, "rate_what": "uploaded", "measured_at": item.data_path_measured_at,
         "batches": max(0, item.acked_seq - item.uploaded_seq) if item.data_path_measured_at else None},
        {"stage": "cache_storage", "name": "Cache storage", "waiting_bytes": item.storage_waiting_bytes,
         "what": "of logs waiting to be applied", "rate": item.applied_bytes_per_s, "rate_what": "applied",
         "measured_at": item.storage_measured_at,
         "batches": max(0, item.uploaded_seq - item.applied_seq) if item.data_path_measured_at else None},
    ]
