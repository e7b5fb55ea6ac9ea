"""The agent trusts its own registration, not the configuration server's word: it reads only
the disks it registered (or its push installer listed), and takes the vault passphrase from a
file or standard input only. The configuration server here is the test double of
``fixtures_ps`` (the real one is tested in tests/replication and tests/e2e)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid

from mobility.agent import Agent, load_item_state
from mobility.transport import RetryPolicy

try:
    from tests.dataplane.fixtures_ps import (  # noqa: F401 - fixtures
        MiB, assignment_for, config_server, machine_for, make_disk, replay, sha256_file, start_ps, stored_batches,
        stored_seqs, vault, zero_image,
    )
except ImportError:  # tests/dataplane imported as a rootdir-less directory
    from fixtures_ps import (  # type: ignore[no-redef]  # noqa: F401
        MiB, assignment_for, config_server, machine_for, make_disk, replay, sha256_file, start_ps, stored_batches,
        stored_seqs, vault, zero_image,
    )

BLOCK = 64 * 1024
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _canary(path: str) -> str:
    """A file the agent must never read (it stands for /etc/shadow)."""
    with open(path, "wb") as f:
        f.write(b"root:$6$not-for-the-replica:19000:0:99999:7:::\n".ljust(MiB, b"#"))
    return path


def test_an_assignment_naming_disks_the_agent_did_not_register_is_refused(tmp_path, start_ps, vault, config_server,
                                                                          caplog):
    ps = start_ps()
    disk = make_disk(str(tmp_path / "d.img"), 2 * MiB)
    canary = _canary(str(tmp_path / "shadow"))
    good, other_path, other_key, other_journal = (uuid.uuid4() for _ in range(4))
    stub = config_server()
    stub.items = [
        assignment_for(ps, vault, other_path, [(0, canary, None)]),  # a registered key, another path
        {**assignment_for(ps, vault, other_key, [(0, disk, None)]),  # a key it never registered
         "disks": [{"index": 0, "key": "7", "path": canary, "journal_dir": None}]},
        assignment_for(ps, vault, other_journal, [(0, disk, str(tmp_path / "not-mine"))]),  # a journal it never named
        assignment_for(ps, vault, good, [(0, disk, None)]),
    ]
    agent = Agent(state_dir=str(tmp_path / "agent"), config_url=stub.url, passphrase=stub.passphrase,
                  machine=machine_for([(0, disk, None)]), block_bytes=BLOCK, batch_bytes=MiB, retry=FAST_RETRY,
                  assignment_interval=0)
    agent.register()
    with caplog.at_level(logging.ERROR, logger="lifeboat.mobility"):
        agent.replicate_until_caught_up(timeout=60)
    agent.close()

    refused = {other_path: f"names {canary} for disk 0, but this agent registered {disk}",
               other_key: "disk 7", other_journal: "journal"}
    for item_id, said in refused.items():
        logged = [r.getMessage() for r in caplog.records if str(item_id) in r.getMessage()]
        assert logged and "refused the assignment" in logged[0] and said in logged[0], logged
        # Nothing of it was read or sent: no state, no batch in storage, not in the cache of assignments.
        assert load_item_state(agent.state_dir, item_id) is None
        assert stored_seqs(ps.storage(), item_id) == []
        events = [e for e in stub.events_of("error") if e["item_id"] == str(item_id)]
        assert len(events) == 1 and "nothing of it is read or sent" in events[0]["message"]
    cached = json.loads((tmp_path / "agent" / "assignment.json").read_text())
    assert [i["item_id"] for i in cached["items"]] == [str(good)]
    # The item whose disks it registered replicates as ever, byte for byte.
    image = zero_image(str(tmp_path / "replica.img"), 2 * MiB)
    replay(stored_batches(ps.storage(), good, vault.seal_key), {0: image})
    assert sha256_file(image) == sha256_file(disk)
    # A later fetch with the same refusals reports them no more (one event per refusal).
    agent.fetch_assignment()
    assert len(stub.events_of("error")) == 3


def test_a_push_installed_agent_reads_the_disks_its_credentials_list(tmp_path, start_ps, vault, config_server):
    """The simulated site's agents are installed by Lifeboat: credentials.json lists their
    disks and journals (replication/push_install.py); an assignment must match them."""
    ps = start_ps()
    disk = make_disk(str(tmp_path / "d.img"), 1 * MiB)
    journal = str(tmp_path / "journal")
    stub = config_server()
    state = tmp_path / "agent"
    state.mkdir()
    (state / "credentials.json").write_text(json.dumps({
        "agent_id": stub.agent_id, "token": stub.token, "config_url": stub.url,
        "disks": [{"key": 2000, "path": disk, "journal_dir": journal}]}))
    ok, moved = uuid.uuid4(), uuid.uuid4()
    stub.items = [
        {**assignment_for(ps, vault, ok, []), "disks": [{"index": 0, "key": "2000", "path": disk, "journal_dir": journal}]},
        {**assignment_for(ps, vault, moved, []), "disks": [{"index": 0, "key": "2000", "path": disk,
                                                            "journal_dir": str(tmp_path / "elsewhere")}]},
    ]
    agent = Agent(state_dir=str(state), config_url=stub.url, retry=FAST_RETRY)
    assert [i.item_id for i in agent.fetch_assignment()] == [ok]
    assert [e["item_id"] for e in stub.events_of("error")] == [str(moved)]
    # Credentials without a disk list (an install from before) and no agent.json: every item is refused.
    (state / "credentials.json").write_text(json.dumps({"agent_id": stub.agent_id, "token": stub.token,
                                                        "config_url": stub.url}))
    assert agent.fetch_assignment() == []
    assert "register it again with every disk" in stub.events_of("error")[-1]["message"]
    agent.close()


def _cli(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "mobility", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, input=stdin)


def test_the_passphrase_comes_from_a_file_or_standard_input_never_the_command_line(tmp_path, config_server):
    stub = config_server()
    disk = make_disk(str(tmp_path / "d.img"), 1 * MiB)
    state = tmp_path / "agent"
    common = ["register", "--state-dir", str(state), "--config-url", stub.url, "--disk", f"0={disk}"]

    refused = _cli(*common, "--passphrase", stub.passphrase)
    assert refused.returncode == 2
    assert "--passphrase on the command line is refused" in refused.stderr and "--passphrase-file" in refused.stderr
    assert stub.registrations == [] and not state.exists()

    missing = _cli(*common)
    assert missing.returncode == 1 and "--passphrase-file" in missing.stderr and stub.registrations == []
    empty = _cli(*common, "--passphrase-file", "-", stdin="\n")
    assert empty.returncode == 1 and "standard input holds no passphrase" in empty.stderr

    piped = _cli(*common, "--passphrase-file", "-", stdin=stub.passphrase + "\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip() == stub.agent_id
    assert stub.registrations[-1]["passphrase"] == stub.passphrase
    assert stub.passphrase not in (state / "agent.json").read_text()  # never kept
    creds = json.loads((state / "credentials.json").read_text())
    assert creds["disks"] == [{"key": 0, "path": disk, "journal_dir": None}]
    # Registering again sends the agent's token (the machine has an agent: it is this one).
    again = _cli(*common, "--passphrase-file", "-", stdin=stub.passphrase)
    assert again.returncode == 0, again.stderr
    register_calls = [c for c in stub.calls if c[1] == "/api/v1/agents/register"]
    assert "Authorization" not in register_calls[0][2] and register_calls[1][2]["Authorization"] == f"Bearer {stub.token}"
