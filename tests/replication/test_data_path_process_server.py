"""The data path in bytes through real parts: a process server process reporting to the real
configuration server (a live Django server), batches sent to it, apply passes into real local
storage; then the figures on the item's row, its page, the API and /metrics, and the
replica compared byte for byte with the writes sent."""
from __future__ import annotations

import os
import urllib.request
import uuid

import pytest
from django.test import Client, override_settings
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from replication.agents import item_token
from replication.dataplane import batch as batch_format
from replication.dataplane import process_server
from replication.engine import item_apply, reset_storage, storage
from replication.models import DataPathSample, ProtectedItem
from replication.process_servers import process_server_config
from tests.dataplane.fixtures_ps import free_port, make_batch, post_batch, replay, stored_seqs, wait_for, zero_image
from tests.factories import ProcessServerFactory, ProtectedItemFactory, ReplicaDiskFactory, VaultFactory

DISK_BYTES = 4 * 1024 * 1024


class Runner:
    """What ``post_batch`` needs of a running process server."""

    def __init__(self, proc) -> None:
        self.proc = proc
        self.port = proc.port


@pytest.fixture
def site(tmp_path, live_server, transactional_db):
    with override_settings(LIFEBOAT_STORAGE={"kind": "local", "root": str(tmp_path / "storage")},
                           LIFEBOAT_CONFIG_URL=live_server.url, LIFEBOAT_DATA_PATH_RATE_WINDOW=60):
        reset_storage()
        vault = VaultFactory()
        ps = ProcessServerFactory(vault=vault, data_port=free_port())
        item = ProtectedItemFactory(vault=vault, process_server=ps)
        disk = ReplicaDiskFactory(item=item, index=0, capacity_bytes=DISK_BYTES)
        ProtectedItem.objects.filter(pk=item.pk).update(protection_state="PROTECTED")
        config = process_server_config(server=ps, cache_dir=str(tmp_path / "ps-cache"))
        config["report_interval"] = 0.5
        del config["uploaded_url"]  # this test runs the item's apply passes itself, step by step
        proc = process_server.spawn(config, config_path=str(tmp_path / "ps.json"), log_path=str(tmp_path / "ps.log"))
        try:
            yield {"item": item, "disk": disk, "ps": ps, "runner": Runner(proc), "url": live_server.url,
                   "tmp": tmp_path}
        finally:
            proc.kill()
            reset_storage()


def allocated(tmp_path, item_id: uuid.UUID) -> int:
    """Bytes local storage holds for the item's logs, read off the file system."""
    folder = tmp_path / "storage" / "objects" / "logs" / str(item_id)
    return sum(os.stat(folder / name).st_blocks * 512 for name in os.listdir(folder)) if folder.exists() else 0


def test_a_process_servers_heartbeats_and_apply_passes_give_the_data_path_in_bytes(site, admin_user):
    item, runner = site["item"], site["runner"]
    bodies = [make_batch(item.pk, seq, records=4, size=32768) for seq in range(1, 5)]
    for body in bodies:
        assert post_batch(runner, item.pk, item_token(item=item), body).status == 200
    logs = storage()
    wait_for(lambda: stored_seqs(logs, item.pk) == [1, 2, 3, 4], timeout=30, what="the uploads")
    sealed = sum(len(logs.get_object(process_server.object_key(item.pk, s))) for s in range(1, 5))

    # The heartbeats: all uploaded, nothing left in the cache, rates from two samples or more;
    # the samples kept hold the process server's byte counts.
    def reported():
        i = ProtectedItem.objects.get(pk=item.pk)
        kept = DataPathSample.objects.filter(item=item.pk, uploaded_bytes=sealed).exists()
        return i if i.uploaded_seq == 4 and i.ps_pending_bytes == 0 and i.sent_bytes_per_s and kept else None

    row = wait_for(reported, timeout=30, what="heartbeats with the uploads")
    newest = DataPathSample.objects.filter(item=item.pk).order_by("-at").first()
    assert newest.received_bytes == sum(len(b) for b in bodies)
    assert newest.uploaded_bytes == sealed
    assert row.acked_seq == 4 and row.uploaded_bytes_per_s > 0

    # Apply half, then the rest: cache storage holds what is left, then nothing.
    first = item_apply(item_id=item.pk, max_batches=2)
    assert first["batches"] == 2 and first["more"]
    row.refresh_from_db()
    half = sum(len(logs.get_object(process_server.object_key(item.pk, s))) for s in (3, 4))
    assert row.storage_waiting_bytes == allocated(site["tmp"], item.pk) >= half > 0
    assert row.applied_log_bytes == sealed - half and row.applied_seq == 2
    assert item_apply(item_id=item.pk)["batches"] == 2
    row.refresh_from_db()
    assert (row.storage_waiting_bytes, row.applied_log_bytes, row.applied_seq) == (0, sealed, 4)
    assert row.storage_measured_at is not None

    # The replica holds exactly the writes sent.
    image = zero_image(str(site["tmp"] / "expected.img"), DISK_BYTES)
    replay([batch_format.decode(b) for b in bodies], {0: image})
    with open(image, "rb") as f:
        assert logs.read_disk(site["disk"].storage_name, 0, DISK_BYTES) == f.read()

    # Once heartbeats saw the apply, the applied rate is known; the page, the API and /metrics say so.
    row = wait_for(lambda: (r := ProtectedItem.objects.get(pk=item.pk)).applied_bytes_per_s and r, timeout=30,
                   what="a heartbeat after the apply passes")
    client = Client()
    client.force_login(admin_user)
    page = client.get(f"/items/{item.pk}/").content.decode()
    assert 'data-stage="process_server"' in page and 'data-stage="cache_storage"' in page
    assert "uploaded through 4" in page and "/s</strong> applied" in page
    api = APIClient()
    api.force_authenticate(admin_user)

    def rates():
        return ProtectedItem.objects.values_list("applied_bytes_per_s", "sent_bytes_per_s").get(pk=item.pk)

    # Heartbeats go on every half second and move the rates: compare with a row no heartbeat
    # changed while the API answered.
    for _ in range(20):
        before = rates()
        path = api.get(f"/api/v1/replicationProtectedItems/{item.pk}/").json()["data_path"]
        if rates() == before:
            break
    row.applied_bytes_per_s, row.sent_bytes_per_s = before
    assert path["process_server"]["waiting_bytes"] == 0 and path["process_server"]["uploaded_seq"] == 4
    assert path["cache_storage"] == {"waiting_bytes": 0, "bytes_per_s": pytest.approx(row.applied_bytes_per_s),
                                     "measured_at": path["cache_storage"]["measured_at"], "applied_seq": 4}
    assert path["agent"]["bytes_per_s"] == pytest.approx(row.sent_bytes_per_s)
    with urllib.request.urlopen(f"{site['url']}/metrics", timeout=10) as resp:  # over TCP, from this host
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    ingest = families["lifeboat_process_server_ingest_bytes_per_second"].samples
    assert [s.labels["server"] for s in ingest] == [site["ps"].name] and ingest[0].value > 0
    backlog = {s.labels["stage"]: s.value for s in families["lifeboat_item_backlog_bytes"].samples
               if s.labels["item"] == str(item.pk)}
    assert backlog == {"agent": 0, "process_server": 0, "cache_storage": 0}
