"""The process server's batch endpoint, fuzzed: truncated, oversized, reordered, replayed and
forged batches, and random mutations of valid ones, are all refused with a 4xx and leave
the cache, storage and the acknowledged sequence exactly as they were.

The server runs as a real process (``start_ps``); what is stored is compared byte for byte
(hashes of every cached file and storage object) before and after each refusal. The random
part is Hypothesis, seeded by ``LIFEBOAT_FUZZ_SEED`` (default 16).
"""
from __future__ import annotations

import os
import random
import struct
import uuid

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from replication.dataplane import batch as batch_format
from replication.dataplane.auth import STATUS_SUBJECT, issue_token

try:
    from tests.dataplane.fixtures_ps import (  # noqa: F401 - fixtures
        https_request, make_batch, post_batch, start_ps, stored_seqs, vault, wait_for,
    )
    from tests.dataplane.test_process_server import item_answer, stored_snapshot
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from fixtures_ps import (  # type: ignore[no-redef]  # noqa: F401
        https_request, make_batch, post_batch, start_ps, stored_seqs, vault, wait_for,
    )
    from test_process_server import item_answer, stored_snapshot  # type: ignore[no-redef]

SEED = int(os.environ.get("LIFEBOAT_FUZZ_SEED", "16"))
HEADER = batch_format.HEADER
# Header fields the batch checksum does not cover and no rule constrains beyond their type:
# flags (any combination of known flags), the reserved word and source_time_ns. A change
# there yields another valid batch, so the mutations leave them alone (see DESIGN-NOTES).
_FLAGS, _RESERVED, _TIME = slice(5, 6), slice(6, 8), slice(32, 40)
UNCHECKED = set(range(5, 8)) | set(range(32, 40))


def settled_stream(ps, vault, item_id, upto: int) -> dict:
    """Batches 1..upto accepted and uploaded; returns the snapshot of what is stored."""
    for seq in range(1, upto + 1):
        assert post_batch(ps, item_id, vault.item_token(item_id), make_batch(item_id, seq)).body == {"acked_seq": seq}
    storage = ps.storage()
    wait_for(lambda: stored_seqs(storage, item_id) == list(range(1, upto + 1))
             and item_answer(ps, vault, item_id)["uploaded_seq"] == upto, timeout=30, what="the uploads")
    return stored_snapshot(ps, vault, item_id)


def assert_refused(ps, vault, item_id, before, answer, status: int, code: str, name: str) -> None:
    assert (answer.status, answer.body.get("error", {}).get("code")) == (status, code), (name, answer)
    assert answer.body["error"]["message"], name
    assert stored_snapshot(ps, vault, item_id) == before, f"{name} changed what is stored"
    assert not os.listdir(os.path.join(ps.config["cache_dir"], "tmp")), f"{name} left a temp file"


def _records_swapped(body: bytes) -> bytes:
    """The same records in another order, the header (and its checksum) unchanged."""
    b = batch_format.decode(body)
    records = list(reversed(b.records))
    swapped = batch_format.encode(item_id=b.item_id, seq=b.seq, source_time_ns=b.source_time_ns,
                                  records=records, flags=b.flags)
    return body[:HEADER.size] + swapped[HEADER.size:]


def _with_header(body: bytes, **fields) -> bytes:
    magic, version, flags, res, item, seq, t_ns, count, crc = HEADER.unpack_from(body, 0)
    values = dict(magic=magic, version=version, flags=flags, res=res, item=item, seq=seq, t_ns=t_ns, count=count,
                  crc=crc)
    values.update(fields)
    return HEADER.pack(*values.values()) + body[HEADER.size:]


def test_truncated_oversized_reordered_replayed_and_forged_batches_are_refused(start_ps, vault):
    ps = start_ps()
    item_id, other_id = uuid.uuid4(), uuid.uuid4()
    before = settled_stream(ps, vault, item_id, 2)
    token = vault.item_token(item_id)
    good3 = make_batch(item_id, 3, rng=random.Random(3))
    record_end = HEADER.size + batch_format.RECORD.size
    cases = [
        # truncated: inside the header, after it, inside a record header, one byte short
        ("truncated header", dict(token=token, body=good3[:HEADER.size - 1]), 400, "malformed_batch"),
        ("header only", dict(token=token, body=good3[:HEADER.size]), 400, "malformed_batch"),
        ("truncated record header", dict(token=token, body=good3[:record_end - 3]), 400, "malformed_batch"),
        ("one byte short", dict(token=token, body=good3[:-1]), 400, "malformed_batch"),
        ("one byte too many", dict(token=token, body=good3 + b"\0"), 400, "malformed_batch"),
        ("more records than announced", dict(token=token, body=_with_header(good3, count=3)), 400, "malformed_batch"),
        ("fewer records than sent", dict(token=token, body=_with_header(good3, count=5)), 400, "malformed_batch"),
        # oversized: announced above the limit (refused before the body is read)
        ("oversized", dict(token=token, body=b"x", send_body=False,
                           content_length=batch_format.MAX_BATCH_BYTES + 1), 413, "batch_too_large"),
        # reordered: the records of a batch in another order (the checksum is over the order)
        ("records reordered", dict(token=token, body=_records_swapped(good3)), 400, "malformed_batch"),
        # replayed: an acknowledged batch again, as it was and with other contents
        ("replayed as sent", dict(token=token, body=make_batch(item_id, 2)), 409, "replayed_batch"),
        ("replayed with other data", dict(token=token, body=make_batch(item_id, 1, rng=random.Random(7))), 409,
         "replayed_batch"),
        # forged: no token, tokens of another key, item or purpose, a batch of another item
        ("no token", dict(token=None, body=good3), 401, "unauthenticated"),
        ("not a bearer token", dict(token=None, body=good3, headers={"Authorization": f"Token {token}"}), 401,
         "unauthenticated"),
        ("token of another key", dict(token=issue_token(os.urandom(32), f"item:{item_id}"), body=good3), 403,
         "forbidden"),
        ("token of another item", dict(token=vault.item_token(other_id), body=good3), 403, "forbidden"),
        ("status token", dict(token=issue_token(vault.auth_key, STATUS_SUBJECT), body=good3), 403, "forbidden"),
        ("token with a changed signature", dict(token=token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
                                                body=good3), 403, "forbidden"),
        ("batch of another item", dict(token=token, body=make_batch(other_id, 3)), 400, "item_mismatch"),
        ("data changed, checksum kept", dict(token=token, body=good3[:-1] + bytes([good3[-1] ^ 1])), 400,
         "malformed_batch"),
        ("checksum changed", dict(token=token, body=_with_header(good3, crc=HEADER.unpack_from(good3)[-1] ^ 1)), 400,
         "malformed_batch"),
        ("another magic", dict(token=token, body=b"LBB2" + good3[4:]), 400, "malformed_batch"),
        ("another version", dict(token=token, body=_with_header(good3, version=2)), 400, "malformed_batch"),
        ("unknown flag", dict(token=token, body=_with_header(good3, flags=0x80)), 400, "malformed_batch"),
        ("seq zero", dict(token=token, body=_with_header(make_batch(item_id, 3), seq=0)), 400, "malformed_batch"),
    ]
    for name, kw, status, code in cases:
        assert_refused(ps, vault, item_id, before, post_batch(ps, item_id, **kw), status, code, name)
    # reordered: batch 4 before batch 3 is held for its predecessor, then refused as a gap
    gap = post_batch(ps, item_id, token, make_batch(item_id, 4))
    assert_refused(ps, vault, item_id, before, gap, 409, "sequence_gap", "batch 4 before batch 3")
    assert gap.body["acked_seq"] == 2
    # the stream goes on where it was, and only the genuine batches are stored
    assert post_batch(ps, item_id, token, good3).body == {"acked_seq": 3}
    assert post_batch(ps, item_id, token, make_batch(item_id, 4)).body == {"acked_seq": 4}
    storage = ps.storage()
    wait_for(lambda: stored_seqs(storage, item_id) == [1, 2, 3, 4], timeout=30, what="the uploads")
    assert stored_seqs(storage, other_id) == []


# --- random mutations of a valid batch -------------------------------------------------------------


@st.composite
def mutations(draw, body: bytes) -> tuple[str, bytes]:
    """One mutation of ``body`` (never leaving it unchanged) and its description."""
    checked = [i for i in range(len(body)) if i not in UNCHECKED]
    kind = draw(st.sampled_from(["flip", "byte", "truncate", "delete", "insert", "duplicate", "seq", "item",
                                 "count", "swap"]))
    if kind == "flip":
        pos, bit = draw(st.sampled_from(checked)), draw(st.integers(0, 7))
        out = bytearray(body)
        out[pos] ^= 1 << bit
        return f"bit {bit} of byte {pos} flipped", bytes(out)
    if kind == "byte":
        pos = draw(st.sampled_from(checked))
        value = draw(st.integers(0, 255).filter(lambda v: v != body[pos]))
        return f"byte {pos} set to {value}", body[:pos] + bytes([value]) + body[pos + 1:]
    if kind == "truncate":
        n = draw(st.integers(0, len(body) - 1))
        return f"cut to {n} bytes", body[:n]
    if kind == "delete":
        start = draw(st.integers(0, len(body) - 1))
        n = draw(st.integers(1, min(4096, len(body) - start)))
        return f"{n} bytes deleted at {start}", body[:start] + body[start + n:]
    if kind == "insert":
        pos = draw(st.integers(0, len(body)))
        extra = draw(st.binary(min_size=1, max_size=600))
        return f"{len(extra)} bytes inserted at {pos}", body[:pos] + extra + body[pos:]
    if kind == "duplicate":
        return "the batch twice over", body + body
    if kind == "seq":
        seq = draw(st.one_of(st.integers(0, 2), st.integers(4, 2**64 - 1)))
        return f"seq set to {seq}", body[:24] + struct.pack("<Q", seq) + body[32:]
    if kind == "item":
        item = draw(st.uuids().filter(lambda u: u.bytes != body[8:24]))
        return f"item set to {item}", body[:8] + item.bytes + body[24:]
    if kind == "count":
        count = draw(st.integers(0, 2**32 - 1).filter(lambda c: c != HEADER.unpack_from(body)[7]))
        return f"record count set to {count}", body[:40] + struct.pack("<I", count) + body[44:]
    return "records in another order", _records_swapped(body)


def test_mutated_batches_are_never_accepted_nor_stored(start_ps, vault):
    ps = start_ps()
    item_id = uuid.uuid4()
    before = settled_stream(ps, vault, item_id, 2)
    token = vault.item_token(item_id)
    genuine = make_batch(item_id, 3, records=3, size=2048, rng=random.Random(SEED))
    seen: list[tuple[str, int]] = []

    @seed(SEED)
    @settings(max_examples=int(os.environ.get("LIFEBOAT_FUZZ_PS_EXAMPLES", "80")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(mutation=mutations(genuine))
    def run(mutation):
        description, body = mutation
        answer = post_batch(ps, item_id, token, body)
        seen.append((description, answer.status))
        assert answer.status in (400, 409, 413), (description, answer)
        assert answer.body["error"]["code"] and answer.body["error"]["message"], (description, answer)
        if answer.status == 409:
            assert answer.body["acked_seq"] == 2, (description, answer)
        assert stored_snapshot(ps, vault, item_id) == before, f"{description} changed what is stored"
        assert not os.listdir(os.path.join(ps.config["cache_dir"], "tmp")), f"{description} left a temp file"

    run()
    assert len(seen) >= 10, seen
    # nothing of the mutations got in: the genuine batch is still the next one
    assert post_batch(ps, item_id, token, genuine).body == {"acked_seq": 3}
    assert "Traceback" not in ps.log()
