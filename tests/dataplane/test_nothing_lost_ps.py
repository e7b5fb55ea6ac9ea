"""Nothing acknowledged is lost: the process server is SIGKILLed again and again while an
agent replicates a disk that a writer keeps changing; the agent recovers by itself, and in
the end storage holds every acknowledged batch, in seq order without a gap, and replaying
them over an empty disk gives the source disk byte for byte."""
from __future__ import annotations

import random
import threading
import time
import uuid

import pytest

from mobility.agent import Agent, ItemAssignment
from mobility.filter import WriteFilter
from mobility.transport import RetryPolicy
from replication.dataplane import batch as batch_format

try:
    from tests.dataplane.fixtures_ps import (  # noqa: F401 - fixtures
        MiB, PsRunner, assignment_for, free_port, https_request, make_disk, ps_config, replay, sha256_file,
        stored_batches, stored_seqs, vault, wait_for, zero_image,
    )
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from fixtures_ps import (  # type: ignore[no-redef]  # noqa: F401
        MiB, PsRunner, assignment_for, free_port, https_request, make_disk, ps_config, replay, sha256_file,
        stored_batches, stored_seqs, vault, wait_for, zero_image,
    )

KILLS = 20
SIZE = 16 * MiB


@pytest.fixture
def ps_on_fixed_port(tmp_path, vault):
    """A process server that keeps its port across restarts (the agent's URL stays valid)."""
    ps = PsRunner(tmp_path, ps_config(tmp_path, vault, port=free_port()), "ps").start()
    yield ps
    ps.kill()


def test_process_server_killed_twenty_times_loses_nothing(tmp_path, vault, ps_on_fixed_port):
    rng = random.Random(2024)
    ps = ps_on_fixed_port
    disk = make_disk(str(tmp_path / "source.img"), SIZE, seed=3)
    jdir = str(tmp_path / "journal")
    wf = WriteFilter(disk, jdir)
    item_id = uuid.uuid4()
    agent = Agent(
        state_dir=str(tmp_path / "agent"),
        assignment=[ItemAssignment.from_dict(assignment_for(ps, vault, item_id, [(0, disk, jdir)]))],
        block_bytes=64 * 1024, batch_bytes=1 * MiB, max_delay=0.2,
        retry=RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=0.5),
    )
    token = {"Authorization": f"Bearer {vault.item_token(item_id)}"}

    def ps_acked() -> int:
        try:
            return https_request(ps.port, "GET", f"/v1/items/{item_id}", headers=token, timeout=5).body["acked_seq"]
        except OSError:
            return 0

    stop_writer, stop_agent = threading.Event(), threading.Event()
    writes = [0]

    def writer():
        wrng = random.Random(7)
        while not stop_writer.is_set():
            length = 512 * wrng.randint(1, 64)
            wf.write(512 * wrng.randrange(0, (SIZE - length) // 512), wrng.randbytes(length))
            writes[0] += 1
            stop_writer.wait(0.002)

    threads = [threading.Thread(target=writer), threading.Thread(target=agent.run_forever, args=(stop_agent,),
                                                                 kwargs={"poll": 0.05})]
    for t in threads:
        t.start()
    try:
        for _ in range(KILLS):
            # let the stream make progress since the last restart, then kill at a random moment
            floor = ps_acked()
            wait_for(lambda: ps_acked() > floor, timeout=60, interval=0.05, what="progress after a restart")
            time.sleep(rng.uniform(0.0, 0.3))
            ps.kill()
            ps.start()
    finally:
        stop_writer.set()
        threads[0].join()
        stop_agent.set()
        threads[1].join(timeout=120)
    assert not threads[1].is_alive()
    assert writes[0] > 500

    status = agent.replicate_until_caught_up(timeout=120)[str(item_id)]
    agent.close()
    acked = status["acked_seq"]
    assert status["phase"] == "delta" and status["backlog_bytes"] == 0
    assert ps_acked() == acked

    storage = ps.storage()
    wait_for(lambda: len(stored_seqs(storage, item_id)) >= acked, timeout=120, what="every acked batch in storage")
    batches = stored_batches(storage, item_id, vault.seal_key)  # each authenticates and decodes
    assert [b.seq for b in batches] == list(range(1, acked + 1))
    initial = [b.flags & batch_format.FLAG_INITIAL for b in batches]
    assert initial == sorted(initial, reverse=True)  # the initial copy first, then deltas only
    image = zero_image(str(tmp_path / "replica.img"), SIZE)
    replay(batches, {0: image})
    assert sha256_file(image) == sha256_file(disk)
