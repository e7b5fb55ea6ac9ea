"""The process server, run as a real process: protocol, durability, memory bound."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from replication.dataplane import batch as batch_format
from replication.dataplane import process_server, sealing
from replication.dataplane.auth import STATUS_SUBJECT, issue_token, verify_token

try:
    from tests.dataplane.fixtures_ps import (  # noqa: F401 - fixtures
        MiB, https_request, make_batch, post_batch, start_ps, stored_batches, stored_seqs, vault, wait_for,
    )
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from fixtures_ps import (  # type: ignore[no-redef]  # noqa: F401
        MiB, https_request, make_batch, post_batch, start_ps, stored_batches, stored_seqs, vault, wait_for,
    )


def item_answer(ps, vault, item_id) -> dict:
    answer = https_request(ps.port, "GET", f"/v1/items/{item_id}",
                           headers={"Authorization": f"Bearer {vault.item_token(item_id)}"})
    assert answer.status == 200, answer
    return answer.body


def item_state(ps, vault, item_id) -> int:
    return item_answer(ps, vault, item_id)["acked_seq"]


def stored_snapshot(ps, vault, item_id) -> dict:
    """Everything stored about an item: cached files, storage objects (hashes), acked seq."""
    cache = {}
    items_dir = os.path.join(ps.config["cache_dir"], "items")
    for dirpath, _dirs, files in os.walk(items_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                cache[os.path.relpath(path, items_dir)] = hashlib.sha256(f.read()).hexdigest()
    storage = ps.storage()
    objects = {k: hashlib.sha256(storage.get_object(k)).hexdigest() for k in storage.list_objects("logs/")}
    return {"cache": cache, "objects": objects, "acked": item_state(ps, vault, item_id)}


def test_health_and_authenticated_status(start_ps, vault):
    ps = start_ps()
    health = https_request(ps.port, "GET", "/v1/health")
    assert health.status == 200 and health.body["status"] == "ok" and health.body["version"]

    assert https_request(ps.port, "GET", "/v1/status").status == 401
    wrong = issue_token(os.urandom(32), STATUS_SUBJECT)
    assert https_request(ps.port, "GET", "/v1/status", headers={"Authorization": f"Bearer {wrong}"}).status == 401
    # an item token is not a status token
    item_token = vault.item_token(uuid.uuid4())
    assert https_request(ps.port, "GET", "/v1/status", headers={"Authorization": f"Bearer {item_token}"}).status == 401

    item_id = uuid.uuid4()
    assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, 1)).status == 200
    status = https_request(ps.port, "GET", "/v1/status",
                           headers={"Authorization": f"Bearer {issue_token(vault.auth_key, STATUS_SUBJECT)}"})
    assert status.status == 200
    figures = status.body
    for key in ("cache_free_bytes", "pending_upload_bytes", "pending_upload_count", "cpu_percent",
                "memory_rss_bytes", "items"):
        assert key in figures, key
    assert figures["items"][str(item_id)]["acked_seq"] == 1
    assert 0 < figures["memory_rss_bytes"] < 256 * MiB


def test_tokens_are_bound_to_key_and_subject():
    key = os.urandom(32)
    token = issue_token(key, "item:a")
    assert verify_token(key, token, "item:a")
    assert not verify_token(key, token, "item:b")
    assert not verify_token(os.urandom(32), token, "item:a")
    assert not verify_token(key, token[:-1], "item:a")
    assert not verify_token(key, "lb1.\u00e9", "item:a")
    assert issue_token(key, "item:a") == token  # deterministic: the configuration server re-issues it


def test_accepted_batches_are_sealed_into_storage_in_order(start_ps, vault):
    ps = start_ps()
    item_id = uuid.uuid4()
    bodies = [make_batch(item_id, seq, flags=batch_format.FLAG_INITIAL if seq < 3 else 0) for seq in (1, 2, 3)]
    for seq, body in enumerate(bodies, 1):
        answer = post_batch(ps, item_id, vault.item_token(item_id), body)
        assert (answer.status, answer.body) == (200, {"acked_seq": seq})
    storage = ps.storage()
    wait_for(lambda: stored_seqs(storage, item_id) == [1, 2, 3], timeout=30, what="uploads")
    for seq, body in enumerate(bodies, 1):
        sealed = storage.get_object(f"logs/{item_id}/{seq:020d}.lbs")
        assert sealing.unseal(sealed, key=vault.seal_key, context=f"{item_id}:{seq}".encode()) == body
        # sealed for its own position: moved to another seq it no longer opens
        with pytest.raises(sealing.TamperedData):
            sealing.unseal(sealed, key=vault.seal_key, context=f"{item_id}:{seq + 1}".encode())
    # the cache is emptied once the batches are in storage
    wait_for(lambda: not [n for n in os.listdir(os.path.join(ps.config["cache_dir"], "items", str(item_id)))
                          if n.endswith(".lbs")], timeout=10, what="cache clean-up")


def _bad_cases(vault, item_id, other_id):
    good2 = make_batch(item_id, 2)
    tampered = bytearray(good2)
    tampered[-100] ^= 0x40  # one bit of record data
    return [
        ("malformed", dict(token=vault.item_token(item_id), body=os.urandom(5000)), 400, "malformed_batch", "magic"),
        ("truncated", dict(token=vault.item_token(item_id), body=good2[:-700]), 400, "malformed_batch", "truncated"),
        ("tampered", dict(token=vault.item_token(item_id), body=bytes(tampered)), 400, "malformed_batch", "checksum"),
        ("oversized", dict(token=vault.item_token(item_id), body=b"x", send_body=False,
                           content_length=batch_format.MAX_BATCH_BYTES + 1), 413, "batch_too_large", "limit"),
        ("no token", dict(token=None, body=good2), 401, "unauthenticated", "Bearer"),
        ("wrong token", dict(token=issue_token(os.urandom(32), f"item:{item_id}"), body=good2), 403, "forbidden",
         "not valid"),
        ("other item's token", dict(token=vault.item_token(other_id), body=good2), 403, "forbidden", "not valid"),
        ("batch of another item", dict(token=vault.item_token(item_id), body=make_batch(other_id, 2)), 400,
         "item_mismatch", str(other_id)),
        ("replayed", dict(token=vault.item_token(item_id), body=make_batch(item_id, 1, rng=random.Random(99))), 409,
         "replayed_batch", "already"),
        ("gap", dict(token=vault.item_token(item_id), body=make_batch(item_id, 3)), 409, "sequence_gap",
         "does not follow"),
    ]


def test_bad_batches_are_refused_clearly_and_touch_nothing(start_ps, vault):
    ps = start_ps()
    item_id, other_id = uuid.uuid4(), uuid.uuid4()
    assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, 1)).status == 200
    storage = ps.storage()
    # settled: in storage, recorded as uploaded and dropped from the cache
    wait_for(lambda: stored_seqs(storage, item_id) == [1] and item_answer(ps, vault, item_id)["uploaded_seq"] == 1,
             timeout=30, what="the first upload")
    before = stored_snapshot(ps, vault, item_id)
    for name, kw, status, code, words in _bad_cases(vault, item_id, other_id):
        answer = post_batch(ps, item_id, **kw)
        assert answer.status == status, (name, answer)
        assert answer.body["error"]["code"] == code, (name, answer.body)
        assert words in answer.body["error"]["message"], (name, answer.body)
        if status == 409:
            assert answer.body["acked_seq"] == 1, name
        assert stored_snapshot(ps, vault, item_id) == before, f"{name} changed what is stored"
    assert not os.listdir(os.path.join(ps.config["cache_dir"], "tmp"))  # no temp file left behind
    assert f"refused a batch for item {item_id}" in ps.log()  # the wrong-item attempt is logged
    # the stream goes on where it was
    assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, 2)).body == {"acked_seq": 2}


def open_partial_post(ps, vault, item_id, body: bytes, upto: int, *, headers: dict | None = None):
    """A TLS connection to the server carrying a POST of ``body`` that announces all of it
    but has sent only its first ``upto`` bytes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", ps.port), timeout=60))
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    s.sendall((f"POST /v1/items/{item_id}/batches HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
               f"Authorization: Bearer {vault.item_token(item_id)}\r\n{extra}\r\n").encode())
    if upto:
        s.sendall(body[:upto])
    return s


def test_a_body_cut_short_by_the_client_is_dropped(start_ps, vault):
    ps = start_ps()
    item_id = uuid.uuid4()
    body = make_batch(item_id, 1, records=64, size=64 * 1024)
    with open_partial_post(ps, vault, item_id, body, len(body) // 2):  # half of it, then hang up
        wait_for(lambda: item_answer(ps, vault, item_id)["receiving_batches"] == 1, timeout=10,
                 what="the body to start arriving")
    wait_for(lambda: item_answer(ps, vault, item_id)["receiving_batches"] == 0, timeout=10, what="the request to end")
    assert not os.listdir(os.path.join(ps.config["cache_dir"], "tmp"))
    assert item_state(ps, vault, item_id) == 0
    assert post_batch(ps, item_id, vault.item_token(item_id), body).body == {"acked_seq": 1}


def _post_in_thread(ps, vault, item_id, body, answers: list) -> threading.Thread:
    t = threading.Thread(target=lambda: answers.append(post_batch(ps, item_id, vault.item_token(item_id), body)))
    t.start()
    return t


def test_a_batch_that_overtakes_its_predecessor_waits_for_it_without_holding_its_slot(start_ps, vault):
    """An agent sends a few batches at once on several connections: batch 2 may be in the
    server, sealed and durable, before batch 1 has begun. It waits for batch 1 (for a short
    grace even when nothing announced it), holding neither memory nor the one ingest slot,
    so batch 1 gets through and both are acknowledged in order."""
    ps = start_ps(max_ingest=1)
    item_id = uuid.uuid4()
    one = make_batch(item_id, 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # batch 1's connection is made (TLS handshake done) but carries nothing yet
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", ps.port), timeout=60)) as late:
        answers: list = []
        second = _post_in_thread(ps, vault, item_id, make_batch(item_id, 2), answers)
        tmp_dir = os.path.join(ps.config["cache_dir"], "tmp")
        wait_for(lambda: os.listdir(tmp_dir), timeout=10, what="batch 2 to be cached, waiting for batch 1")
        late.sendall((f"POST /v1/items/{item_id}/batches HTTP/1.1\r\nHost: x\r\nContent-Length: {len(one)}\r\n"
                      f"Authorization: Bearer {vault.item_token(item_id)}\r\n\r\n").encode() + one)
        head = late.recv(4096).decode()
    second.join(30)
    assert head.startswith("HTTP/1.1 200"), head
    assert [(a.status, a.body) for a in answers] == [(200, {"acked_seq": 2})]
    assert item_state(ps, vault, item_id) == 2
    storage = ps.storage()
    wait_for(lambda: stored_seqs(storage, item_id) == [1, 2], timeout=30, what="both uploads")


def test_a_predecessor_announced_by_its_seq_header_is_waited_for_past_the_grace(start_ps, vault):
    """``X-Lifeboat-Seq`` announces a batch as soon as its request line is read, before any
    of its body: a later batch waits for it however long its body takes (within io_timeout),
    while a batch whose predecessor nobody announced is refused once the grace is over."""
    ps = start_ps()
    item_id = uuid.uuid4()
    one, two = make_batch(item_id, 1), make_batch(item_id, 2)
    with open_partial_post(ps, vault, item_id, one, 0, headers={"X-Lifeboat-Seq": "1"}) as slow:
        wait_for(lambda: item_answer(ps, vault, item_id)["receiving_batches"] == 1, timeout=10,
                 what="batch 1 to be announced")
        answers: list = []
        second = _post_in_thread(ps, vault, item_id, two, answers)
        time.sleep(process_server.GAP_GRACE_SECONDS + 1.5)
        assert second.is_alive() and not answers, answers  # still waiting for batch 1
        slow.sendall(one)
        head = slow.recv(4096).decode()
        assert head.startswith("HTTP/1.1 200"), head
    second.join(30)
    assert [(a.status, a.body) for a in answers] == [(200, {"acked_seq": 2})]
    started = time.monotonic()
    gap = post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, 4))
    assert (gap.status, gap.body["error"]["code"], gap.body["acked_seq"]) == (409, "sequence_gap", 2)
    assert time.monotonic() - started >= process_server.GAP_GRACE_SECONDS
    assert item_state(ps, vault, item_id) == 2


def test_a_batch_waits_for_sealing_memory_then_is_told_to_retry(start_ps, vault):
    """A maximum-size batch takes the whole sealing budget: a second one waits while the first
    is still arriving and, past io_timeout, is answered 503 busy with Retry-After and nothing
    stored. Once the first is done, the second goes through."""
    ps = start_ps(io_timeout=3)
    slow_id, other_id = uuid.uuid4(), uuid.uuid4()
    size = (batch_format.MAX_BATCH_BYTES - 4096) // 512 * 512
    slow = batch_format.encode(item_id=slow_id, seq=1, source_time_ns=1,
                               records=[batch_format.Record(batch_format.KIND_WRITE, 0, 0, bytes(size))])
    other = batch_format.encode(item_id=other_id, seq=1, source_time_ns=1,
                                records=[batch_format.Record(batch_format.KIND_WRITE, 0, 0, b"\1" * size)])
    with open_partial_post(ps, vault, slow_id, slow, len(slow) // 2) as s:
        wait_for(lambda: item_answer(ps, vault, slow_id)["receiving_batches"] == 1, timeout=10,
                 what="the first batch to start arriving")
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(
            post_batch(ps, other_id, vault.item_token(other_id), other)))
        waiting.start()
        sent = len(slow) // 2
        for _ in range(6):  # keep the first one trickling in, well within io_timeout
            time.sleep(1)
            s.sendall(slow[sent : sent + 4096])
            sent += 4096
        waiting.join(30)
        busy = answers[0]
        assert (busy.status, busy.body["error"]["code"]) == (503, "busy"), busy
        assert busy.headers.get("retry-after") == "1"
        assert item_state(ps, vault, other_id) == 0
        s.sendall(slow[sent:])
        head = s.recv(4096).decode()
        assert head.startswith("HTTP/1.1 200"), head
    assert post_batch(ps, other_id, vault.item_token(other_id), other).body == {"acked_seq": 1}
    assert item_state(ps, vault, slow_id) == 1


def test_other_requests_are_refused(start_ps, vault):
    ps = start_ps()
    item_id = uuid.uuid4()
    token = {"Authorization": f"Bearer {vault.item_token(item_id)}"}
    assert https_request(ps.port, "GET", "/v1/nothing").status == 404
    assert https_request(ps.port, "POST", "/v1/items/not-a-uuid/batches", headers=token, body=b"x").status == 404
    assert https_request(ps.port, "PUT", f"/v1/items/{item_id}/batches", headers=token, body=b"x").status == 405
    chunked = https_request(ps.port, "POST", f"/v1/items/{item_id}/batches",
                            headers={**token, "Transfer-Encoding": "chunked"}, body=b"0\r\n\r\n",
                            content_length=None, send_body=False)
    assert chunked.status == 411


def test_stream_validator_judges_exactly_like_decode():
    rng = random.Random(11)
    item_id = uuid.uuid4()
    for case in range(1500):
        recs = []
        for _ in range(rng.randint(0, 5)):
            if rng.random() < 0.2:
                recs.append(batch_format.Record(batch_format.KIND_BOOKMARK, 0, 0, b'{"l":1}'[: rng.randint(0, 7)]))
            else:
                recs.append(batch_format.Record(batch_format.KIND_WRITE, rng.randint(0, 3), 512 * rng.randint(0, 99),
                                                rng.randbytes(512 * rng.randint(1, 3))))
        buf = bytearray(batch_format.encode(item_id=item_id, seq=rng.randint(1, 9), source_time_ns=1,
                                            records=recs, flags=rng.choice([0, 1, 3, 4])))
        mutation = rng.random()
        if mutation < 0.3:
            buf = buf[: rng.randint(0, len(buf))]
        elif mutation < 0.6:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif mutation < 0.7:
            buf += rng.randbytes(rng.randint(1, 40))
        data = bytes(buf)
        try:
            decoded = batch_format.decode(data)
            expected = "ok"
        except batch_format.MalformedBatch as e:
            expected = str(e)
        validator = batch_format.StreamValidator()
        try:
            pos = 0
            while pos < len(data):
                step = rng.randint(1, 900)
                validator.feed(data[pos : pos + step])
                pos += step
            info = validator.finish()
            got = "ok"
            assert (info.item_id, info.seq, info.flags, info.record_count, info.size) == (
                decoded.item_id, decoded.seq, decoded.flags, len(decoded.records), len(data))
        except batch_format.MalformedBatch as e:
            got = str(e)
        assert got == expected, (case, got, expected)


def test_acknowledged_batches_survive_sigkill(start_ps, vault, tmp_path):
    """Acks come only after the batch is durable: SIGKILL right after them loses nothing."""
    item_id = uuid.uuid4()
    storage_root = tmp_path / "ps-storage"
    # Uploads fail (an object sits where the logs directory must go), so the acknowledged
    # batches are still only in the cache when the server is killed.
    (storage_root / "objects").mkdir(parents=True)
    (storage_root / "objects" / "logs").write_bytes(b"in the way")
    ps = start_ps()
    bodies = {seq: make_batch(item_id, seq, records=8, size=32 * 1024) for seq in range(1, 13)}
    for seq, body in bodies.items():
        assert post_batch(ps, item_id, vault.item_token(item_id), body).body == {"acked_seq": seq}
    ps.kill()
    cached = sorted(n for n in os.listdir(tmp_path / "ps-cache" / "items" / str(item_id)) if n.endswith(".lbs"))
    assert len(cached) == 12  # nothing reached storage before the kill
    (storage_root / "objects" / "logs").unlink()
    ps.start()
    assert item_state(ps, vault, item_id) == 12
    storage = ps.storage()
    wait_for(lambda: stored_seqs(storage, item_id) == list(range(1, 13)), timeout=60, what="uploads after restart")
    for b in stored_batches(storage, item_id, vault.seal_key):
        assert batch_format.encode(item_id=b.item_id, seq=b.seq, source_time_ns=b.source_time_ns,
                                   records=b.records, flags=b.flags) == bodies[b.seq]
    # a batch resent after the crash is recognised, not stored twice
    answer = post_batch(ps, item_id, vault.item_token(item_id), bodies[12])
    assert (answer.status, answer.body["error"]["code"], answer.body["acked_seq"]) == (409, "replayed_batch", 12)


def test_the_cache_holds_batches_only_sealed(start_ps, vault, tmp_path):
    """What waits in the cache is already the sealed object storage will get: no plaintext of
    a batch rests on the process server's disk, and the upload writes no second copy."""
    item_id = uuid.uuid4()
    storage_root = tmp_path / "ps-storage"
    (storage_root / "objects").mkdir(parents=True)
    (storage_root / "objects" / "logs").write_bytes(b"in the way")  # uploads fail for now
    ps = start_ps()
    marker = b"plaintext that must not rest in the cache " * 200
    rec = batch_format.Record(batch_format.KIND_WRITE, 0, 0, marker + bytes(-len(marker) % 512))
    body = batch_format.encode(item_id=item_id, seq=1, source_time_ns=1, records=[rec])
    assert post_batch(ps, item_id, vault.item_token(item_id), body).body == {"acked_seq": 1}
    cached = tmp_path / "ps-cache" / "items" / str(item_id) / f"{1:020d}.lbs"
    blob = cached.read_bytes()
    assert marker[:64] not in blob
    assert sealing.unseal(blob, key=vault.seal_key, context=process_server.seal_context(item_id, 1)) == body
    inode = os.stat(cached).st_ino
    (storage_root / "objects" / "logs").unlink()
    storage = ps.storage()
    wait_for(lambda: stored_seqs(storage, item_id) == [1], timeout=30, what="the upload")
    stored = storage_root / "objects" / "logs" / str(item_id) / f"{1:020d}.lbs"
    assert os.stat(stored).st_ino == inode  # the cache file itself, linked into storage
    wait_for(lambda: not cached.exists(), timeout=10, what="cache clean-up")
    assert stored.read_bytes() == blob


def test_decode_may_skip_only_the_checksum():
    """An unsealed batch is authenticated already, so the apply engine skips the checksum;
    every structural rule still holds."""
    item_id = uuid.uuid4()
    body = bytearray(make_batch(item_id, 1))
    body[-10] ^= 1
    with pytest.raises(batch_format.MalformedBatch, match="checksum"):
        batch_format.decode(bytes(body))
    assert batch_format.decode(bytes(body), check_crc=False).records[-1].data[-10] == body[-10]
    with pytest.raises(batch_format.MalformedBatch, match="truncated"):
        batch_format.decode(bytes(body[:-600]), check_crc=False)
    with pytest.raises(batch_format.MalformedBatch, match="magic"):
        batch_format.decode(b"XXXX" + bytes(body[4:]), check_crc=False)


def test_memory_stays_bounded_under_a_large_backlog(start_ps, vault):
    """Four senders push 768 MiB of maximum-size batches (three times the 256 MiB memory
    bound, six times the 128 MiB cache cap) while the server uploads."""
    ps = start_ps(max_cache_bytes=128 * MiB)
    proc = psutil.Process(ps.pid)
    payload = random.Random(5).randbytes(batch_format.MAX_BATCH_BYTES - 4096)
    peak = {"rss": 0, "pending": 0, "refused": 0}
    done = threading.Event()
    status_token = issue_token(vault.auth_key, STATUS_SUBJECT)

    def watch():
        while not done.is_set():
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            done.wait(0.02)

    def push(n: int):
        item_id = uuid.uuid4()
        seq = 1
        while seq <= 6:
            body = batch_format.encode(item_id=item_id, seq=seq, source_time_ns=1, records=[
                batch_format.Record(batch_format.KIND_WRITE, 0, 0, memoryview(payload)[: len(payload) // 512 * 512])])
            answer = post_batch(ps, item_id, vault.item_token(item_id), body, timeout=120)
            if answer.status == 503:
                assert answer.body["error"]["code"] == "cache_full"
                peak["refused"] += 1
                done.wait(0.2)
                continue
            assert answer.body == {"acked_seq": seq}
            seq += 1
            st = https_request(ps.port, "GET", "/v1/status", headers={"Authorization": f"Bearer {status_token}"})
            peak["pending"] = max(peak["pending"], st.body["pending_upload_bytes"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    senders = [threading.Thread(target=push, args=(n,)) for n in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in senders)
    storage = ps.storage()
    wait_for(lambda: len(storage.list_objects("logs/")) == 24, timeout=120, what="the backlog's upload")
    done.set()
    watcher.join()
    print(f"process server peak RSS {peak['rss'] / MiB:.0f} MiB, peak cached {peak['pending'] / MiB:.0f} MiB, refused {peak['refused']}")
    assert peak["rss"] < 256 * MiB, f"process server peaked at {peak['rss'] / MiB:.0f} MiB"
    assert peak["pending"] <= 128 * MiB  # the cache cap held: senders were told to come back later


def test_several_process_servers_run_side_by_side(start_ps, vault):
    a, b = start_ps(name="ps-a"), start_ps(name="ps-b")
    assert a.port != b.port and a.thumbprint != b.thumbprint
    item_id = uuid.uuid4()
    body = make_batch(item_id, 1)
    assert post_batch(a, item_id, vault.item_token(item_id), body).status == 200
    assert post_batch(b, item_id, vault.item_token(item_id), body).status == 200
    wait_for(lambda: stored_seqs(a.storage(), item_id) == [1] and stored_seqs(b.storage(), item_id) == [1],
             timeout=30, what="uploads on both servers")


class VaultListener:
    """A plain HTTP listener standing in for the configuration server: it keeps each POST as
    (path, Authorization header, JSON body) in ``received`` and answers with
    ``answer(body)`` (a dict sent as JSON) or, without ``answer``, 204."""

    def __init__(self, answer=None) -> None:
        import http.server

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.path, self.headers.get("Authorization"), body))
                if answer is None:
                    self.send_response(204)
                    self.end_headers()
                    return
                payload = json.dumps(answer(body)).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_heartbeat_reports_to_the_configuration_server(start_ps, vault):
    """The report goes to a plain HTTP listener standing in for the configuration server."""
    listener = VaultListener()
    received = listener.received
    try:
        ps = start_ps(report_url=f"{listener.base}/api/v1/processServers/7/heartbeat",
                      report_token="ps-secret", report_interval=0.2)
        wait_for(lambda: received, timeout=20, what="a heartbeat")
        path, auth, body = received[0]
        assert path == "/api/v1/processServers/7/heartbeat" and auth == "Bearer ps-secret"
        assert body["thumbprint"] == ps.thumbprint
        for key in ("cpu_percent", "memory_percent", "cache_free_bytes", "cache_total_bytes", "pending_upload_bytes",
                    "items"):
            assert key in body, key
    finally:
        listener.close()


def test_new_logs_in_storage_wake_the_vault_and_a_vault_that_does_not_answer_stops_nothing(start_ps, vault):
    """Each upload puts the item in the next wake-up POST (to ``uploaded_url``, with the
    server's token); while nothing answers there the server goes on uploading and counts
    the failures."""
    listener = VaultListener(answer=lambda body: {"woken": len(body["items"])})
    received = listener.received

    def status() -> dict:
        return https_request(ps.port, "GET", "/v1/status",
                             headers={"Authorization": f"Bearer {issue_token(vault.auth_key, STATUS_SUBJECT)}"}).body

    url = f"{listener.base}/api/v1/processServers/7/uploaded"
    a, b = uuid.uuid4(), uuid.uuid4()
    bodies = {(a, 1): make_batch(a, 1), (b, 1): make_batch(b, 1), (a, 2): make_batch(a, 2), (a, 3): make_batch(a, 3)}
    try:
        ps = start_ps(uploaded_url=url, report_token="ps-secret", wake_interval=0.05)
        for item_id in (a, b):
            assert post_batch(ps, item_id, vault.item_token(item_id), bodies[item_id, 1]).status == 200
        wait_for(lambda: {i for _p, _a, body in received for i in body["items"]} == {str(a), str(b)},
                 timeout=20, what="wake-ups for both items")
        assert {(p, auth) for p, auth, _b in received} == {("/api/v1/processServers/7/uploaded", "Bearer ps-secret")}
        seen = len(received)
        assert post_batch(ps, a, vault.item_token(a), bodies[a, 2]).status == 200
        wait_for(lambda: len(received) > seen, timeout=20, what="a wake-up for the second batch")
        assert received[-1][2] == {"items": [str(a)]}
        figures = status()
        assert figures["wakeups_sent"] == len(received) and figures["wakeup_errors"] == 0
    finally:
        listener.close()
    # Nobody listens any more: batches are still acknowledged and uploaded.
    assert post_batch(ps, a, vault.item_token(a), bodies[a, 3]).status == 200
    wait_for(lambda: stored_seqs(ps.storage(), a) == [1, 2, 3], timeout=30, what="the upload without the vault")
    wait_for(lambda: status()["wakeup_errors"] >= 1, timeout=20, what="the failed wake-up counted")
    for item_id, count in ((a, 3), (b, 1)):
        stored = stored_batches(ps.storage(), item_id, vault.seal_key)
        assert stored == [batch_format.decode(bodies[item_id, n]) for n in range(1, count + 1)]


def test_certificate_is_kept_and_its_thumbprint_printed(start_ps, tmp_path):
    ps = start_ps()
    first = ps.thumbprint
    key_path = tmp_path / "ps-cache" / "tls" / "key.pem"
    assert oct(os.stat(key_path).st_mode & 0o777) == "0o600"
    ps.stop()
    out = subprocess.run([sys.executable, "-m", "replication.dataplane.process_server", "--config",
                          str(tmp_path / "ps.json"), "--print-thumbprint"], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == first
    ps.start()
    assert ps.thumbprint == first


@pytest.mark.parametrize("change, words", [
    ({"seal_key": base64.b64encode(b"short").decode()}, "'seal_key' must be 32 bytes"),
    ({"auth_key": "not base64!"}, "'auth_key' is not valid base64"),
    ({"listen": "nowhere"}, "'listen' must be HOST:PORT"),
    ({"cache_dir": None}, "'cache_dir' is required"),
    ({"storage": {"kind": "tape"}}, "'storage'"),
    ({"ingest_memory_bytes": 64 * 1024 * 1024}, "'ingest_memory_bytes' must be at least"),
    ({"wake_interval": -1}, "'wake_interval' must be from 0 to 60 seconds"),
    ({"wake_interval": "soon"}, "'wake_interval' must be a number"),
])
def test_bad_configuration_is_refused_with_its_reason(tmp_path, vault, change, words):
    try:
        from tests.dataplane.fixtures_ps import ps_config
    except ImportError:
        from fixtures_ps import ps_config  # type: ignore[no-redef]
    cfg = ps_config(tmp_path, vault)
    cfg.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "replication.dataplane.process_server", "--config", str(path)],
                         capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 2
    assert words in out.stderr, out.stderr


def test_object_names_and_contexts_are_the_contract():
    item_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert process_server.object_key(item_id, 42) == f"logs/{item_id}/00000000000000000042.lbs"
    assert process_server.seal_context(item_id, 42) == f"{item_id}:42".encode()


# -- the stream's position survives the loss of the cache --------------------------------------


def _apply_all(ps, vault, item_id) -> int:
    """Apply what storage holds for the item (as a worker would) and clean its logs up."""
    from replication.dataplane.apply import ReplicaApplier

    applier = ReplicaApplier(ps.storage(), key=vault.seal_key, item_id=item_id, disks={0: (f"d-{item_id.hex[:8]}", 2 * MiB)})
    return applier.apply_pending(crash_consistent_interval_s=0).applied_seq


def test_a_lost_cache_does_not_send_the_stream_back_behind_the_replica(start_ps, vault, tmp_path):
    """Apply has caught up and deleted every log; the cache (certificate included) is lost.
    The server must take the item up where the replica stands, not at 0."""
    item_id = uuid.uuid4()
    ps = start_ps()
    for seq in range(1, 6):
        assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, seq)).status == 200
    wait_for(lambda: stored_seqs(ps.storage(), item_id) == [1, 2, 3, 4, 5], timeout=30, what="uploads")
    assert _apply_all(ps, vault, item_id) == 5
    assert stored_seqs(ps.storage(), item_id) == []
    ps.kill()
    shutil.rmtree(tmp_path / "ps-cache")
    ps.start()
    assert item_state(ps, vault, item_id) == 5
    answer = post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, 1))
    assert (answer.status, answer.body["error"]["code"], answer.body["acked_seq"]) == (409, "replayed_batch", 5)
    assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, 6)).body == {"acked_seq": 6}
    wait_for(lambda: stored_seqs(ps.storage(), item_id) == [6], timeout=30, what="the next upload")


def test_a_cache_restored_from_an_old_copy_does_not_upload_stale_batches(start_ps, vault, tmp_path):
    """The server comes back with an old copy of its cache (batches 1-3 pending) after storage
    and the replica moved on to 6: the old batches are dropped, not uploaded again, and the
    item goes on after 6."""
    item_id = uuid.uuid4()
    blocker = tmp_path / "ps-storage" / "objects" / "logs"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"in the way")
    ps = start_ps()
    for seq in range(1, 4):
        assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, seq)).status == 200
    ps.kill()
    shutil.copytree(tmp_path / "ps-cache", tmp_path / "old-cache")
    blocker.unlink()
    ps.start()
    for seq in range(4, 7):
        assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, seq)).status == 200
    wait_for(lambda: stored_seqs(ps.storage(), item_id) == [1, 2, 3, 4, 5, 6], timeout=30, what="uploads")
    assert _apply_all(ps, vault, item_id) == 6
    ps.kill()
    shutil.rmtree(tmp_path / "ps-cache")
    shutil.copytree(tmp_path / "old-cache", tmp_path / "ps-cache")
    ps.start()
    assert item_state(ps, vault, item_id) == 6
    time.sleep(1.5)  # uploaders had time to put the stale batches, if they were to
    assert stored_seqs(ps.storage(), item_id) == []
    assert not [n for n in os.listdir(tmp_path / "ps-cache" / "items" / str(item_id)) if n.endswith(".lbs")]
    assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, 7)).body == {"acked_seq": 7}


@pytest.mark.parametrize("lost", ["the item's folder", "the whole cache directory"])
def test_an_items_cache_folder_lost_under_the_running_server_is_owned_up_to(start_ps, vault, tmp_path, lost):
    """Acknowledged batches vanish from the cache while the server runs: it must not keep
    claiming them; it answers with what storage holds, so the agent resynchronizes."""
    item_id = uuid.uuid4()
    blocker = tmp_path / "ps-storage" / "objects" / "logs"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"in the way")
    ps = start_ps()
    for seq in range(1, 4):
        assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, seq)).status == 200
    shutil.rmtree(tmp_path / "ps-cache" / ("items/" + str(item_id) if lost == "the item's folder" else ""))
    blocker.unlink()
    answer = None
    for _ in range(3):  # the first answer may be "retry" (the loss found on this very request)
        answer = post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, 4))
        if answer.status != 503:
            break
    assert (answer.status, answer.body["error"]["code"], answer.body["acked_seq"]) == (409, "sequence_gap", 0)
    assert item_state(ps, vault, item_id) == 0
    assert stored_seqs(ps.storage(), item_id) == []
    assert "lost acknowledged data" in ps.log() and "batches 1-3 never reached storage" in ps.log()


def test_storage_that_cannot_say_where_a_stream_stands_gets_retry_not_a_guess(start_ps, vault, tmp_path):
    """A new item whose position storage cannot tell (its replica state unreadable): 503, and
    nothing is acknowledged or stored."""
    item_id = uuid.uuid4()
    state = tmp_path / "ps-storage" / "objects" / "replicas" / str(item_id) / "state.json"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"{not json")
    ps = start_ps()
    answer = post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, 1))
    assert (answer.status, answer.body["error"]["code"]) == (503, "storage_unavailable")
    assert answer.headers.get("retry-after")
    assert not (tmp_path / "ps-cache" / "items" / str(item_id)).exists()
    assert stored_seqs(ps.storage(), item_id) == []


# --- the replica's digests, for resynchronization -----------------------------------------------------


def digest_get(ps, path: str, token: str | None) -> tuple[int, dict, bytes]:
    """GET a digest resource: (status, lower-case headers, raw body)."""
    import http.client

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", ps.port, timeout=30, context=ctx)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_replica_digests_are_asked_for_then_served(start_ps, vault):
    from mobility.checksums import fine_digests, group_digests
    from replication.dataplane import digests

    ps = start_ps()
    storage = ps.storage()
    item_id = uuid.uuid4()
    token = vault.item_token(item_id)
    size = 2 * MiB + 8192
    image = random.Random(4).randbytes(size)
    storage.create_disk("replica-0", size)
    storage.write_disk("replica-0", 0, image)
    storage.flush_disk("replica-0")

    status, headers, body = digest_get(ps, f"/v1/items/{item_id}/digests/0?min_seq=7", token)
    assert status == 202 and headers["retry-after"] and json.loads(body)["status"] == "computing"
    assert digests.digest_request_read(storage, item_id) == 7
    status, _h, _b = digest_get(ps, f"/v1/items/{item_id}/digests/0/blocks?min_seq=7&groups=0-1", token)
    assert status == 202

    # the worker's part, with the real function: the replica has applied seq 7
    assert digests.digest_request_answer(storage, item_id=item_id, disks={0: "replica-0"}, applied_seq=7)
    assert digests.digest_request_read(storage, item_id) is None
    fine = fine_digests(image)
    status, headers, body = digest_get(ps, f"/v1/items/{item_id}/digests/0?min_seq=7", token)
    assert status == 200 and body == group_digests(fine)
    assert (headers["x-lifeboat-applied-seq"], headers["x-lifeboat-disk-size"], headers["x-lifeboat-block-bytes"],
            headers["x-lifeboat-group-blocks"]) == ("7", str(size), "4096", "16")
    status, _h, body = digest_get(ps, f"/v1/items/{item_id}/digests/0/blocks?min_seq=5&groups=0-1,32", token)
    assert status == 200 and body == fine[: 2 * 256] + fine[32 * 256:]  # group 32 holds two blocks

    # digests older than asked for are not served: a newer request is left
    status, _h, _b = digest_get(ps, f"/v1/items/{item_id}/digests/0?min_seq=8", token)
    assert status == 202 and digests.digest_request_read(storage, item_id) == 8

    # a wrong token gets nothing and leaves nothing
    other = uuid.uuid4()
    status, _h, body = digest_get(ps, f"/v1/items/{other}/digests/0?min_seq=1", vault.item_token(item_id))
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
    status, _h, _b = digest_get(ps, f"/v1/items/{other}/digests/0?min_seq=1", None)
    assert status == 403
    assert digests.digest_request_read(storage, other) is None


@pytest.mark.parametrize("query", [
    "digests/0", "digests/0?min_seq=", "digests/0?min_seq=-1", "digests/0?min_seq=1x", "digests/0?min_seq=1&min_seq=2",
    "digests/0?min_seq=1&groups=0", "digests/0?min_seq=99999999999999999999", "digests/0?min_seq=1&x=1",
    "digests/x?min_seq=1", "digests/64?min_seq=1", "digests/-1?min_seq=1", "digests/0?min_seq=1&&",
    "digests/0/blocks?min_seq=1", "digests/0/blocks?min_seq=1&groups=", "digests/0/blocks?min_seq=1&groups=3-1",
    "digests/0/blocks?min_seq=1&groups=1,1", "digests/0/blocks?min_seq=1&groups=a", "digests/0/blocks?groups=1",
    "digests/0/blocks?min_seq=1&groups=0-5000",
])
def test_malformed_digest_requests_get_400_and_write_nothing(start_ps, vault, query):
    from replication.dataplane import digests

    ps = start_ps()
    item_id = uuid.uuid4()
    status, _h, body = digest_get(ps, f"/v1/items/{item_id}/{query}", vault.item_token(item_id))
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and len(error["message"]) > 10  # a sentence saying what is wrong
    assert digests.digest_request_read(ps.storage(), item_id) is None


def test_block_digests_of_groups_outside_the_disk_get_400(start_ps, vault):
    from replication.dataplane import digests

    ps = start_ps()
    storage = ps.storage()
    item_id = uuid.uuid4()
    storage.create_disk("r", 65536 * 2)
    digests.digest_request_write(storage, item_id, 1)
    assert digests.digest_request_answer(storage, item_id=item_id, disks={0: "r"}, applied_seq=1)
    token = vault.item_token(item_id)
    assert digest_get(ps, f"/v1/items/{item_id}/digests/0/blocks?min_seq=1&groups=1", token)[0] == 200
    status, _h, body = digest_get(ps, f"/v1/items/{item_id}/digests/0/blocks?min_seq=1&groups=2", token)
    assert status == 400 and "outside" in json.loads(body)["error"]["message"]
