"""Block digests of replica disks (``replication.dataplane.digests``), on real local storage,
and the agent's half of them (``mobility.checksums``)."""
from __future__ import annotations

import json
import random
import uuid

import pytest
from blake3 import blake3

from mobility.checksums import fine_digests, group_digests
from replication.dataplane import digests
from replication.dataplane.storage.local import LocalStorage


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(str(tmp_path / "storage"))


def test_block_and_group_digests_are_truncated_blake3():
    rng = random.Random(1)
    data = rng.randbytes(5 * 65536 + 3 * 4096 + 512)  # the last group and block are short
    fine = fine_digests(data)
    assert len(fine) == 16 * (5 * 16 + 4)
    assert fine[:16] == blake3(data[:4096]).digest()[:16]
    assert fine[-16:] == blake3(data[-512:]).digest()[:16]
    groups = group_digests(fine)
    assert len(groups) == 16 * 6
    assert groups[:16] == blake3(fine[:256]).digest()[:16]
    assert groups[-16:] == blake3(fine[5 * 256:]).digest()[:16]
    # computed piecewise on group boundaries, as the worker reads a disk, they are the same
    assert fine_digests(data[:65536 * 2]) + fine_digests(data[65536 * 2:]) == fine
    with pytest.raises(ValueError):
        group_digests(b"x" * 17)


def test_disk_digests_object_round_trip_and_slices(storage):
    rng = random.Random(2)
    size = 3 * 1024 * 1024 + 8192
    image = bytearray(rng.randbytes(size))
    storage.create_disk("d0", size)
    storage.write_disk("d0", 0, image)
    storage.flush_disk("d0")
    got_size, blocks = digests.disk_block_digests(storage, "d0", piece_bytes=1024 * 1024)
    assert got_size == size and blocks == fine_digests(image)
    raw = digests.encode_object(applied_seq=42, disk_size=size, blocks=blocks)
    obj = digests.decode_object(raw)
    assert (obj.applied_seq, obj.disk_size, obj.blocks) == (42, size, blocks)
    assert obj.group_count == 49 and obj.groups() == group_digests(blocks)
    assert digests.blocks_of_groups(obj, [0, 48]) == blocks[:256] + blocks[48 * 256:]
    assert len(digests.blocks_of_groups(obj, [48])) == 2 * 16  # the last group holds two blocks
    with pytest.raises(digests.DigestError):
        digests.blocks_of_groups(obj, [49])
    with pytest.raises(digests.DigestError):
        digests.decode_object(raw[:-1])
    with pytest.raises(digests.DigestError):
        digests.decode_object(b"XXXX" + raw[4:])
    with pytest.raises(digests.DigestError):
        digests.decode_object(raw[:10])
    with pytest.raises(digests.DigestError):
        digests.encode_object(applied_seq=1, disk_size=size, blocks=blocks[:-16])


def test_group_lists_parse_strictly():
    assert digests.parse_groups("0-3,7,9-10", group_count=11) == [0, 1, 2, 3, 7, 9, 10]
    assert digests.format_groups([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    for bad in ("", "a", "1-", "-1", "3-1", "1,1", "2,1", "0-11", "1,,2", "1 ", "0x1", "1-2-3"):
        with pytest.raises(digests.DigestError):
            digests.parse_groups(bad, group_count=11)
    with pytest.raises(digests.DigestError, match="at most"):
        digests.parse_groups("0-4096", group_count=10_000)


def test_the_worker_answers_a_request_once_the_replica_has_applied_enough(storage):
    item = uuid.uuid4()
    storage.create_disk("a", 65536 * 2)
    storage.create_disk("b", 4096)
    storage.write_disk("a", 4096, b"\x01" * 4096)
    storage.flush_disk("a")
    disks = {0: "a", 1: "b"}
    assert not digests.digest_request_answer(storage, item_id=item, disks=disks, applied_seq=9)  # nothing asked
    digests.digest_request_write(storage, item, 5)
    digests.digest_request_write(storage, item, 3)  # a request for as much or more is kept
    assert digests.digest_request_read(storage, item) == 5
    assert not digests.digest_request_answer(storage, item_id=item, disks=disks, applied_seq=4)
    assert digests.digest_request_answer(storage, item_id=item, disks=disks, applied_seq=5)
    assert digests.digest_request_read(storage, item) is None
    a = digests.decode_object(storage.get_object(digests.digest_key(item, 0)))
    assert a.applied_seq == 5 and a.blocks == fine_digests(storage.read_disk("a", 0, 65536 * 2))
    b = digests.decode_object(storage.get_object(digests.digest_key(item, 1)))
    assert b.disk_size == 4096 and b.blocks == fine_digests(bytes(4096))
    storage.put_object(digests.request_key(item), json.dumps({"min_seq": "x"}).encode())
    assert digests.digest_request_read(storage, item) is None  # malformed: not a request
