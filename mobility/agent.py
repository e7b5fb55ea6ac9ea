"""The mobility agent: registration, change tracking and shipping of protected items.

For each protected item the agent keeps one stream of batches (seq 1, 2, ...) to the item's
process server:

1. Initial replication: before reading anything it notes, per journaled disk, the journal's
   newest seq (the *base*); then it reads every block of every disk and ships them in
   batches flagged FLAG_INITIAL, the last one also FLAG_INITIAL_DONE. Journal records after
   the base follow in the same stream, so every write that raced with the copy is applied
   after the block it changed: the replica ends right whatever the copy read. An item
   whose replica already holds a copy of its disks (assignment ``"seeded": true``: seeded
   from the original disk on failback, or replicated before by an agent whose state for it
   is gone) has no initial copy: its first pass is a full checksum resync (3.) against the
   replica, which sends only the blocks that differ.
2. Delta replication: journaled disks ship their write-filter journal in write order
   (records of several disks merged by time, each disk's own order kept); disks without a
   journal are compared block by block (BLAKE3 digests) with the block map and changed
   blocks are shipped (``FLAG_UNFROZEN``: read from the live disk, so the replica mixes
   moments; with a snapshot command the scan reads frozen views instead and its last batch
   says ``FLAG_FROZEN_END``). A bookmark (app-consistent marker) is placed after every write
   journaled before it was requested and is always the last record of its batch.
3. Resynchronization: when the journal overflowed, skipped or restarted, or the process
   server lost acknowledged batches that carried writes (lost ticks and lone bookmarks are
   sent again: ``ItemState.acked_writeless``), the agent reports ``resync_required`` to the
   configuration server and stops shipping the item. When told (assignment ``"resync":
   true``, ``Agent.request_resync`` or ``python -m mobility resync``) it takes a new journal
   base, re-arms the journal and compares the source with the replica as it is: once every
   batch before the pass is acknowledged it sends an empty FLAG_RESYNC batch (the pass's
   *digest seq*) and asks the process server for the replica's 64 KiB group digests computed
   after that seq (``mobility.checksums``; while the worker computes them the cycle ends
   "waiting for the replica's checksums" and the next one asks again). Each source block
   read is cut into 4 KiB blocks and 64 KiB groups; for the groups that differ the replica's
   4 KiB digests are fetched (one request per few MiB of source) and only the 4 KiB blocks
   that differ are sent, adjacent ones as one record, in batches planned as ``"ranges"``.
   A process server that does not serve digests (404) gets the older pass: every block
   whose checksum differs from the block map (every block, if the replica may have lost data).
4. Disks that change shape (``_check_disks``, at the start of every cycle). A disk that grew
   or was added is announced by a disk record (``KIND_DISK``: the disk's size from here on)
   in a batch of its own, before any batch that writes past its old end; the journal is
   read no further than a disk's announced end. A disk added to the item gets its own full
   copy (a pass over that disk only, flagged FLAG_RESYNC so no point is cut with it half
   copied, then its catch-up) while the other disks keep their journal positions and block
   maps; a disk added during another pass is copied after it. A disk that left the
   assignment is announced with size 0 and forgotten. A disk that shrank (vSphere never
   shrinks one) needs a full resynchronization.

Crash safety. Before a batch is sent its *plan* (which blocks, or which journal records) is
saved durably with the item's state (``slots.SlotFile``); a batch whose answer the agent
never saw is rebuilt from its plan and sent again with the same seq. Journal plans rebuild byte-identical
batches; block plans re-read the disk, and when the process server answers "already
acknowledged" the agent cannot know which content got there, so it marks those blocks
unknown in the block map and a later scan or resync sends them again. Journal segments are
deleted only once acknowledged.

Registration and trust. ``register`` sends the vault passphrase and the machine's disks
(key, path and, for a write-filtered disk, its journal directory); the configuration server
answers with the agent's id and token (kept in ``credentials.json``, 0600, with the disks).
Registering again sends the token, which a machine that has an agent already requires:
without it the registration waits for an administrator's approval, and the agent (``run``,
or ``register`` again) asks for its credentials until then (``registration.json``). The
agent reads only the disks it registered: an assignment that names another path or journal
for a disk, or a disk it never registered, is refused with an error (nothing of that item is
read or sent), so a forged or malicious configuration server cannot make it read another
file. A push-installed agent's disks are those its installer listed in ``credentials.json``.
Tokens carry a generation: a process server refusing an item token (rotated) or an
assignment carrying a new agent token (``agent_token``: the agent's token was rotated) makes
the agent take the new one from the configuration server.

Code map: the ``Agent`` (this module) registers, fetches the assignment, heartbeats and
takes requests; ``mobility.runner.ItemRunner`` runs one item, with its passes in
``copy_pass``, ``checksum_pass``, ``journal_batches``, ``bookmarks``, ``disk_shape`` and
``resync``; its crash-safety state is ``mobility.state.ItemState``; batches are encoded by
``mobility.wire`` and sent by ``mobility.sender``; ``mobility.requests`` leaves requests for
a running agent (``bookmark``, ``resync``, the guest's freeze hook).

Threads: one thread drives an ``Agent`` (``run_once``/``run_forever``); each item has up to
``window`` sender threads (one pinned HTTPS connection each) and a saver thread, so reading
and hashing the next batch overlaps with sending and with waiting for the disk.
``request_bookmark`` and ``request_resync`` may be called from any thread or process: they
leave a request in the state directory.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from mobility import wire
from mobility.assignment import DiskAssignment, ItemAssignment
from mobility.errors import AgentError, RegistrationPending
from mobility.jsonfile import read_json, write_json
from mobility.requests import guest_freeze, write_bookmark_request, write_request
from mobility.runner import ItemRunner
from mobility.state import (
    PHASE_DELTA,
    PHASE_INITIAL,
    PHASE_RESYNC,
    PHASE_RESYNC_REQUIRED,
    ItemState,
    load_item_state,
)
from mobility.transport import JsonClient, PinMismatch, RetryPolicy, TransportError, plain_http_warning

__all__ = [
    "AGENT_VERSION", "BATCH_BYTES", "BLOCK_BYTES", "MAX_DELAY", "PHASE_DELTA", "PHASE_INITIAL", "PHASE_RESYNC",
    "PHASE_RESYNC_REQUIRED", "TICK_INTERVAL", "Agent", "AgentError", "DiskAssignment", "ItemAssignment", "ItemState",
    "RegistrationPending", "guest_freeze", "load_item_state", "write_request",
]

log = logging.getLogger("lifeboat.mobility")

AGENT_VERSION = "1.0"
BLOCK_BYTES = 1024 * 1024
BATCH_BYTES = 8 * 1024 * 1024
MAX_DELAY = 1.0
TICK_INTERVAL = 5.0  # an idle item sends an empty batch this often (0: never)


class Agent:
    """A mobility agent. In-process use::

        agent = Agent(state_dir=..., config_url=..., passphrase=..., machine={...})
        agent.register()                       # once; credentials are kept in state_dir
        agent.replicate_until_caught_up()      # or agent.run_once() / agent.run_forever(stop)

    Without a configuration server pass ``assignment=[ItemAssignment(...)]``.
    """

    def __init__(
        self,
        *,
        state_dir: str,
        config_url: str | None = None,
        passphrase: str | None = None,
        machine: dict | None = None,
        hostname: str | None = None,
        config_ca_file: str | None = None,
        config_thumbprint: str | None = None,
        assignment: list[ItemAssignment] | None = None,
        block_bytes: int = BLOCK_BYTES,
        batch_bytes: int = BATCH_BYTES,
        max_delay: float = MAX_DELAY,
        tick_interval: float = TICK_INTERVAL,
        window: int = 3,
        retry: RetryPolicy | None = None,
        io_timeout: float = 60.0,
        heartbeat_interval: float = 30.0,
        assignment_interval: float = 60.0,
        scan_interval: float = 60.0,
        auto_resync: bool = False,
        snapshot_command: str | None = None,
    ) -> None:
        if block_bytes % wire.SECTOR or batch_bytes < block_bytes + 4096 or batch_bytes > wire.MAX_BATCH_BYTES // 2:
            raise AgentError("block_bytes must be whole sectors and a batch must hold at least one block")
        self.state_dir = os.path.abspath(state_dir)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.requests_dir = os.path.join(self.state_dir, "requests")
        os.makedirs(self.requests_dir, mode=0o700, exist_ok=True)
        self.config_url = config_url
        self.passphrase = passphrase
        self.machine = machine
        self.hostname = hostname or socket.gethostname()
        self.block_bytes = block_bytes
        self.batch_bytes = batch_bytes
        self.max_delay = max_delay
        self.tick_interval = tick_interval
        self.window = max(1, window)
        self.retry = retry or RetryPolicy()
        self.io_timeout = io_timeout
        self.heartbeat_interval = heartbeat_interval
        self.assignment_interval = assignment_interval
        self.scan_interval = scan_interval
        self.auto_resync = auto_resync
        # Scans of disks without a journal read frozen views made by this command (module doc).
        self.snapshot_command = snapshot_command
        self._config = (JsonClient(config_url, ca_file=config_ca_file, thumbprint=config_thumbprint)
                        if config_url else None)
        self._fixed_assignment = assignment is not None
        self._refusals_reported: dict[uuid.UUID, str] = {}
        self._assignment: list[ItemAssignment] = list(assignment or [])
        if not self._fixed_assignment:
            cached = read_json(os.path.join(self.state_dir, "assignment.json"), {"items": []})
            self._assignment = self._registered_only([ItemAssignment.from_dict(i) for i in cached.get("items", [])],
                                                     report=False)
        self._assignment_at = 0.0
        self._registration_polled_at = 0.0
        self._heartbeat_at = 0.0
        self._runners: dict[uuid.UUID, ItemRunner] = {}
        self._lock = threading.Lock()
        self._phases_reported: dict[str, str] = {}

    # -- configuration server

    @property
    def credentials(self) -> dict | None:
        return read_json(os.path.join(self.state_dir, "credentials.json"))

    @property
    def pending_registration(self) -> dict | None:
        """A registration the configuration server keeps for an administrator's approval."""
        return read_json(os.path.join(self.state_dir, "registration.json"))

    def _save_credentials(self, agent_id: str, token: str, disks: list[dict]) -> None:
        write_json(os.path.join(self.state_dir, "credentials.json"),
                   {"agent_id": agent_id, "token": token, "config_url": self.config_url, "disks": disks}, mode=0o600)

    def register(self) -> str:
        """Register with the configuration server; returns the agent id. Kept credentials are
        returned as they are unless a machine and passphrase are given: then the agent
        registers again with its token (its disks may have changed). Raises
        ``RegistrationPending`` while an administrator has to approve the registration."""
        if self.pending_registration:
            agent_id = self.poll_registration()
            if agent_id is None:
                raise self._pending_error()
            return agent_id
        creds = self.credentials
        if creds and not (self.machine and self.passphrase):
            return creds["agent_id"]
        if self._config is None or not self.passphrase or not self.machine:
            raise AgentError("registering needs config_url, passphrase and machine")
        insecure = plain_http_warning(self.config_url)
        if insecure:
            log.warning("%s", insecure)
            print(f"WARNING: {insecure}", file=sys.stderr, flush=True)
        body = {"passphrase": self.passphrase, "hostname": self.hostname, "machine": self.machine,
                "version": AGENT_VERSION}
        # The machine's own agent shows its token: without it, re-registering waits for approval.
        token = creds["token"] if creds and creds.get("config_url") == self.config_url else None
        answer = self.retry.run(lambda: self._config.call("POST", "/api/v1/agents/register", body=body, token=token))
        disks = [{"key": int(d["key"]), "path": str(d["path"]), "journal_dir": d.get("journal_dir") or None}
                 for d in self.machine.get("disks", [])]
        if answer.get("status") == "pending":
            if not answer.get("registration_id") or not answer.get("poll_token"):
                raise AgentError(f"the configuration server's pending registration lacks registration_id/poll_token: "
                                 f"{answer}")
            write_json(os.path.join(self.state_dir, "registration.json"),
                       {"registration_id": str(answer["registration_id"]), "poll_token": answer["poll_token"],
                        "config_url": self.config_url, "disks": disks, "message": str(answer.get("message", ""))},
                       mode=0o600)
            raise self._pending_error()
        if not answer.get("agent_id") or not answer.get("token"):
            raise AgentError(f"the configuration server's registration answer lacks agent_id/token: {answer}")
        self._save_credentials(str(answer["agent_id"]), answer["token"], disks)
        log.info("registered as agent %s", answer["agent_id"])
        return str(answer["agent_id"])

    def _pending_error(self) -> RegistrationPending:
        pending = self.pending_registration or {}
        said = pending.get("message") or "The registration is waiting for an administrator's approval in the portal."
        return RegistrationPending(
            f"{said} (registration {pending.get('registration_id')}). 'python -m mobility run' takes the credentials "
            "once it is approved; 'python -m mobility register' asks again.",
            registration_id=str(pending.get("registration_id")))

    def poll_registration(self) -> str | None:
        """Ask whether the pending registration was decided: the agent id once it is approved
        (the credentials are saved), None while it waits. A rejected (or unknown, or
        superseded) registration is forgotten and raises ``AgentError``."""
        pending = self.pending_registration
        if not pending:
            creds = self.credentials
            return creds["agent_id"] if creds else None
        if self._config is None:
            raise AgentError("asking about a pending registration needs config_url")
        registration_id = pending["registration_id"]
        try:
            answer = self.retry.run(lambda: self._config.call(
                "GET", f"/api/v1/agents/registrations/{registration_id}", token=pending["poll_token"]))
        except TransportError as e:
            if e.status in (403, 404, 409):  # rejected, unknown to the server, or superseded: final
                os.unlink(os.path.join(self.state_dir, "registration.json"))
                raise AgentError(f"registration {registration_id} will not be approved: {e}; register again") from None
            raise
        if answer.get("status") == "pending":
            return None
        if not answer.get("agent_id") or not answer.get("token"):
            raise AgentError(f"the configuration server's approved registration lacks agent_id/token: {answer}")
        self._save_credentials(str(answer["agent_id"]), answer["token"], pending.get("disks") or [])
        os.unlink(os.path.join(self.state_dir, "registration.json"))
        log.info("registration %s approved: registered as agent %s", registration_id, answer["agent_id"])
        return str(answer["agent_id"])

    def registered_disks(self) -> dict[str, tuple[str, str | None]] | None:
        """{disk key: (path, journal dir)} of the disks this agent registered (or its
        installer listed), the only ones it reads; None if it has no record of them."""
        creds = self.credentials or {}
        disks = creds.get("disks")
        if disks is None:  # credentials from before the disks were kept with them
            disks = ((read_json(os.path.join(self.state_dir, "agent.json")) or {}).get("machine") or {}).get("disks")
        if disks is None:
            return None
        return {str(int(d["key"])): (os.path.normpath(str(d["path"])),
                                     os.path.normpath(d["journal_dir"]) if d.get("journal_dir") else None)
                for d in disks}

    def _assignment_refusal(self, item: ItemAssignment, registered: dict[str, tuple[str, str | None]] | None) -> str:
        """Why the agent will not read an assigned item's disks ("" if it will)."""
        if registered is None:
            return ("this agent has no record of the disks it registered: register it again with every disk "
                    "(python -m mobility register ... --disk KEY=PATH)")
        for disk in item.disks:
            mine = registered.get(str(disk.key))
            if mine is None:
                return f"the assignment names disk {disk.key} ({disk.path}), which this agent never registered"
            path, journal = mine
            if os.path.normpath(disk.path) != path:
                return (f"the assignment names {disk.path} for disk {disk.key}, but this agent registered {path} "
                        "for it")
            if disk.journal_dir and os.path.normpath(disk.journal_dir) != journal:
                return (f"the assignment names the journal {disk.journal_dir} for disk {disk.key}, which this agent "
                        "never registered")
        return ""

    def _registered_only(self, items: list[ItemAssignment], *, report: bool) -> list[ItemAssignment]:
        """The items whose disks are all disks this agent registered; the others are refused
        with an error (logged, and with ``report`` also reported to the configuration
        server) and nothing of them is read or sent."""
        registered = self.registered_disks()
        accepted = []
        for item in items:
            refusal = self._assignment_refusal(item, registered)
            if not refusal:
                accepted.append(item)
                continue
            message = f"refused the assignment of item {item.item_id}: {refusal}; nothing of it is read or sent"
            log.error("%s", message)
            if report and self._refusals_reported.get(item.item_id) != message:
                self._refusals_reported[item.item_id] = message  # once, not at every fetch
                self.report_event(item.item_id, "error", f"Agent: {message}.")
        return accepted

    def _agent_call(self, method: str, suffix: str, body: dict | None = None) -> dict:
        creds = self.credentials
        if self._config is None or not creds:
            raise AgentError("the agent is not registered with a configuration server")
        return self._config.call(method, f"/api/v1/agents/{creds['agent_id']}{suffix}", body=body,
                                 token=creds["token"])

    def fetch_assignment(self) -> list[ItemAssignment]:
        """Fetch (and cache, 0600) the items this agent protects."""
        if self._fixed_assignment:
            return self._assignment
        answer = self.retry.run(lambda: self._agent_call("GET", "/assignment"))
        creds = self.credentials or {}
        if answer.get("agent_token") and answer["agent_token"] != creds.get("token"):
            # The agent's token was rotated: the new one, saved before it is used.
            write_json(os.path.join(self.state_dir, "credentials.json"), {**creds, "token": answer["agent_token"]},
                       mode=0o600)
            log.info("took the agent's rotated token")
        items = self._registered_only([ItemAssignment.from_dict(i) for i in answer.get("items", [])], report=True)
        write_json(os.path.join(self.state_dir, "assignment.json"), {"items": [i.to_dict() for i in items]},
                    mode=0o600)
        with self._lock:
            self._assignment = items
            self._assignment_at = time.monotonic()
            for item_id in [i for i in self._runners if i not in {x.item_id for x in items}]:
                self._runners.pop(item_id).close()
        return items

    def report_event(self, item_id: uuid.UUID, kind: str, message: str, *, seq: int | None = None) -> bool:
        if self._config is None or not self.credentials:
            log.warning("item %s: %s (%s) not reported: no configuration server", item_id, kind, message)
            return False
        body: dict[str, Any] = {"item_id": str(item_id), "kind": kind, "message": message}
        if seq is not None:
            body["seq"] = seq
        try:
            RetryPolicy(max_attempts=3, max_delay=1.0).run(lambda: self._agent_call("POST", "/events", body))
            return True
        except (TransportError, AgentError) as e:
            log.warning("item %s: reporting %s failed: %s", item_id, kind, e)
            return False

    def heartbeat_body(self) -> dict:
        return {"version": AGENT_VERSION, "items": self.status()}

    def send_heartbeat(self) -> dict:
        self._heartbeat_at = time.monotonic()
        return self.retry.run(lambda: self._agent_call("POST", "/heartbeat", self.heartbeat_body()))

    # -- replication

    @property
    def assignment(self) -> list[ItemAssignment]:
        return list(self._assignment)

    def _runner(self, item: ItemAssignment) -> ItemRunner:
        runner = self._runners.get(item.item_id)
        if runner is not None and runner.item != item:  # another process server, token or disks
            runner.close()
            runner = None
        if runner is not None:
            runner.item = item  # fresh resync flag and bookmarks
        if runner is None:
            runner = self._runners[item.item_id] = ItemRunner(self, item)
        return runner

    def run_once(self, *, flush: bool = True, scan: bool = False) -> dict[str, dict]:
        """One pass over every assigned item: ship what is there to ship (with ``flush``
        also partial batches; with ``scan`` a checksum scan of unjournaled disks even if
        not due). Errors of one item are logged and kept in its status; the next pass
        retries. Returns the items' status by item id."""
        # A registration waiting for approval (the credentials kept, if any, were refused).
        if self._config is not None and not self._fixed_assignment and self.pending_registration and (
            time.monotonic() - self._registration_polled_at >= min(self.assignment_interval, 30.0)
        ):
            self._registration_polled_at = time.monotonic()
            try:
                if self.poll_registration() is None:
                    log.info("%s", self._pending_error())
                else:
                    self._assignment_at = 0.0  # approved: fetch the assignment with the new credentials now
            except (TransportError, AgentError) as e:
                log.error("asking about the pending registration failed: %s", e)
        if self._config is not None and not self._fixed_assignment and self.credentials and (
            not self._assignment_at or time.monotonic() - self._assignment_at >= self.assignment_interval
        ):
            try:
                self.fetch_assignment()
            except (TransportError, AgentError) as e:
                log.warning("fetching the assignment failed (using the cached one): %s", e)
                self._assignment_at = time.monotonic()
        self._take_requests()
        # An item that left the assignment (failed over, disabled) gives back its runner and
        # open disk files: when it returns, its saved state is loaded anew and its disks are
        # opened again (a failback may have replaced a disk file meanwhile).
        assigned = {item.item_id for item in self.assignment}
        for item_id in [i for i in self._runners if i not in assigned]:
            self._runners.pop(item_id).close()
        for item in self.assignment:
            runner = self._runner(item)
            try:
                runner.cycle(flush=flush, scan=scan)
                runner.last_error = ""
            except PinMismatch as e:
                runner.last_error = str(e)
                log.error("item %s: %s", item.item_id, e)
                self._assignment_at = 0.0
            except (TransportError, AgentError, OSError) as e:
                runner.last_error = str(e)
                log.warning("item %s: replication pass stopped: %s", item.item_id, e)
                if isinstance(e, TransportError) and e.status in (401, 403):
                    self._assignment_at = 0.0  # the token may have been rotated
        phases = {s["item_id"]: s["phase"] for s in self.status()}
        changed = phases != self._phases_reported
        if self._config is not None and self.credentials and (
            changed or time.monotonic() - self._heartbeat_at >= self.heartbeat_interval
        ):
            self._phases_reported = phases
            try:
                self.send_heartbeat()
            except (TransportError, AgentError) as e:
                log.warning("heartbeat failed: %s", e)
                if isinstance(e, TransportError) and e.status in (401, 403):
                    self._assignment_at = 0.0  # a rotated token: the assignment hands out the new one
        return {s["item_id"]: s for s in self.status()}

    def caught_up(self) -> bool:
        return all(self._runner(i).caught_up() for i in self.assignment)

    def replicate_until_caught_up(self, *, timeout: float = 600.0, poll: float = 0.05) -> dict[str, dict]:
        """Run passes until every item is in delta replication with nothing left to send."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.run_once(flush=True, scan=True)
            if self.caught_up():
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not caught up after {timeout:.0f}s: {status}")
            time.sleep(poll)

    def run_forever(self, stop: threading.Event | None = None, *, poll: float = 0.2) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            self.run_once(flush=False)
            stop.wait(poll)

    def request_bookmark(self, item_id: uuid.UUID | str, label: str) -> str:
        """Bookmark the item's stream after every write journaled so far (call it while the
        application is quiesced); returns the bookmark's id. Safe from any thread: the
        request (with the journals' positions now) is left in the state dir and the
        replicating loop takes it on its next pass."""
        item_id = uuid.UUID(str(item_id))
        item = next((i for i in self.assignment if i.item_id == item_id), None)
        if item is None:
            raise AgentError(f"item {item_id} is not assigned to this agent")
        bookmark_id = str(uuid.uuid4())
        write_bookmark_request(self.requests_dir, item, bookmark_id, label)
        return bookmark_id

    def request_resync(self, item_id: uuid.UUID | str) -> None:
        """Resynchronize the item from the next pass on (it also clears resync_required)."""
        item_id = uuid.UUID(str(item_id))
        if not any(i.item_id == item_id for i in self.assignment):
            raise AgentError(f"item {item_id} is not assigned to this agent")
        write_request(self.state_dir, "resync", str(item_id))

    def _take_requests(self) -> None:
        """Bookmarks asked for through files (``python -m mobility bookmark``)."""
        for name in sorted(os.listdir(self.requests_dir)):
            if not (name.startswith("bookmark-") and name.endswith(".json")):
                continue
            path = os.path.join(self.requests_dir, name)
            req = read_json(path) or {}
            try:
                item_id = uuid.UUID(str(req["item_id"]))
                item = next((i for i in self.assignment if i.item_id == item_id), None)
                if item is None:
                    raise AgentError(f"item {item_id} is not assigned to this agent")
                positions = req.get("positions")
                self._runner(item).add_bookmark(str(req.get("id") or uuid.uuid4()), str(req.get("label", "")),
                                                positions={str(k): int(v) for k, v in positions.items()}
                                                if positions is not None else None,
                                                group=str(req["group"]) if req.get("group") else None)
            except (AgentError, KeyError, ValueError, TransportError) as e:
                log.warning("bookmark request %s ignored: %s", name, e)
            os.unlink(path)

    def status(self) -> list[dict]:
        return [self._runner(i).status() for i in self.assignment]

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()
