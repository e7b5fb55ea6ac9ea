"""The process server's own metrics endpoint and the byte counters of its heartbeat.

A real process server process, real local storage, real batches; the metrics are read over
HTTP and parsed with Prometheus' own text parser."""
from __future__ import annotations

import json
import urllib.request
import uuid

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from replication.dataplane import process_server
from replication.dataplane.auth import STATUS_SUBJECT, issue_token
from replication.dataplane.process_server.config import ConfigError, ServerConfig

try:
    from tests.dataplane.fixtures_ps import (  # noqa: F401 - fixtures
        https_request, make_batch, post_batch, ps_config, start_ps, stored_seqs, vault, wait_for,
    )
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from fixtures_ps import (  # type: ignore[no-redef]  # noqa: F401
        https_request, make_batch, post_batch, ps_config, start_ps, stored_seqs, vault, wait_for,
    )


def server_info(ps) -> dict:
    with open(ps.proc.cache_dir + "/server.json") as f:
        return json.load(f)


def scrape(port: int) -> dict[str, dict]:
    """{sample name: {labels as a sorted tuple: value}}, through Prometheus' text parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    out["__text__"] = {(): text}
    return out


def stored_sizes(ps, item_id: uuid.UUID) -> int:
    storage = ps.storage()
    return sum(len(storage.get_object(process_server.object_key(item_id, seq))) for seq in stored_seqs(storage, item_id))


def test_metrics_count_ingest_uploads_and_refusals_on_loopback_only(start_ps, vault):
    ps = start_ps()
    port = server_info(ps)["metrics_port"]
    assert port and port != ps.port
    # Served on the loopback address only (the default 'metrics_listen').
    listening = [c.laddr for c in psutil.Process(ps.pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [a.ip for a in listening] == ["127.0.0.1"]

    item = uuid.uuid4()
    bodies = [make_batch(item, seq, records=3, size=16384) for seq in (1, 2, 3)]
    for body in bodies:
        assert post_batch(ps, item, vault.item_token(item), body).status == 200
    assert post_batch(ps, item, vault.item_token(item), bodies[0]).body["error"]["code"] == "replayed_batch"
    assert post_batch(ps, item, vault.item_token(uuid.uuid4()), bodies[1]).status == 403
    wait_for(lambda: stored_seqs(ps.storage(), item) == [1, 2, 3], timeout=30, what="the uploads")

    def settled():
        m = scrape(port)
        return m if m["lifeboat_process_server_cache_pending_bytes"][()] == 0 else None

    m = wait_for(settled, timeout=30, what="the cache to empty")
    assert m["lifeboat_process_server_received_bytes_total"][()] == sum(len(b) for b in bodies)
    assert m["lifeboat_process_server_received_batches_total"][()] == 3
    assert m["lifeboat_process_server_uploaded_bytes_total"][()] == stored_sizes(ps, item)
    assert m["lifeboat_process_server_uploaded_batches_total"][()] == 3
    refused = m["lifeboat_process_server_refused_requests_total"]
    assert refused[(("code", "replayed_batch"),)] == 1 and refused[(("code", "forbidden"),)] == 1
    assert m["lifeboat_process_server_items"][()] == 1
    assert m["lifeboat_process_server_upload_errors_total"][()] == 0
    # no uploaded_url in this server's configuration: it tells the vault nothing
    assert m["lifeboat_process_server_wakeups_sent_total"][()] == m["lifeboat_process_server_wakeup_errors_total"][()] == 0
    # Counters only: no key, token or item of the server's is in the page.
    text = m["__text__"][()]
    for secret in (ps.config["auth_key"], ps.config["seal_key"], vault.item_token(item), str(item)):
        assert secret not in text


def test_status_reports_each_items_bytes_since_the_start(start_ps, vault):
    ps = start_ps(max_ingest_bytes_per_s=0)
    a, b = uuid.uuid4(), uuid.uuid4()
    sent = {a: [make_batch(a, s, size=8192) for s in (1, 2)], b: [make_batch(b, 1, records=6, size=32768)]}
    for item, bodies in sent.items():
        for body in bodies:
            assert post_batch(ps, item, vault.item_token(item), body).status == 200
    wait_for(lambda: stored_seqs(ps.storage(), a) == [1, 2] and stored_seqs(ps.storage(), b) == [1], timeout=30,
             what="the uploads")
    token = issue_token(vault.auth_key, STATUS_SUBJECT)

    def status():
        body = https_request(ps.port, "GET", "/v1/status", headers={"Authorization": f"Bearer {token}"}).body
        return body if body["pending_upload_bytes"] == 0 else None

    body = wait_for(status, timeout=30, what="the cache to empty")
    for item, bodies in sent.items():
        figures = body["items"][str(item)]
        assert figures["received_bytes"] == sum(len(x) for x in bodies)
        assert figures["uploaded_bytes"] == stored_sizes(ps, item)
        assert figures["pending_bytes"] == 0
    assert body["received_bytes"] == sum(len(x) for bodies in sent.values() for x in bodies)
    assert body["uploaded_bytes"] == stored_sizes(ps, a) + stored_sizes(ps, b)
    assert body["received_batches"] == body["uploaded_batches"] == 3
    assert abs(body["started_at"] - psutil.Process(ps.pid).create_time()) < 30

    # A restart starts the counters again, with a new start time.
    before = body["started_at"]
    ps.stop()
    ps.start()
    after = https_request(ps.port, "GET", "/v1/status", headers={"Authorization": f"Bearer {token}"}).body
    assert after["started_at"] > before and after["received_bytes"] == 0


def test_metrics_endpoint_can_be_turned_off_or_given_a_port(start_ps, tmp_path, vault):
    off = start_ps(name="off", metrics_listen="")
    assert server_info(off)["metrics_port"] is None
    with pytest.raises(ConfigError, match="'metrics_listen' must be HOST:PORT"):
        ServerConfig.from_dict(ps_config(tmp_path, vault, metrics_listen="nowhere"))
    cfg = ServerConfig.from_dict(ps_config(tmp_path, vault, metrics_listen="127.0.0.1:19464"))
    assert cfg.metrics_listen == ("127.0.0.1", 19464)
