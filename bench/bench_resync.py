"""Resynchronization benchmark: Lifeboat's resync against rsync, on the same data in one run.

A disk image (1 GiB by default, random bytes) is replicated: a mobility agent (this process)
makes the initial copy over HTTPS to a process server (its own process), and the apply
engine (in a worker process) writes the replica disk in local storage. Then 1 %
of the image's 4 KiB blocks, at random places, are changed on the source, and:

* Lifeboat: the agent is asked to resynchronize. Its pass compares the source with the
  replica's own digests (computed from the replica disk by the worker, a process of its own
  here as in production, as ``engine.item_apply`` does) and sends only the 4 KiB blocks that differ. The clock runs
  from the request until the replica has applied the pass (and, separately, until the
  process server has acknowledged all of it); the bytes on the wire are every
  byte between the agent and the process server, both ways, TLS included (counted by a TCP
  relay in between). The replica is then compared with the source byte for byte.
* rsync: ``rsync -I --no-whole-file --inplace --stats`` from the changed image to a copy of
  the image as it was (two local paths, rsync's own protocol between its two processes);
  bytes on the wire are rsync's "Total bytes sent" plus "Total bytes received".

Both run ``--rounds`` times (3 by default), alternating which goes first, each round on a
fresh change of the image made after a recovery point was cut (so the resync writes new
chunk versions, as in production), each starting cold; the result is the median.

Prints one JSON object and writes its section of docs/BENCHMARKS.md. Targets: Lifeboat
<= 16 MB on the wire, median wall time <= rsync's. ``LIFEBOAT_BENCH_PROFILE=FILE`` writes
a cProfile of the worker's part during the resyncs to FILE, and of the agent's (its
calling thread) to FILE.agent.

    python bench/bench_resync.py [--size-mib 1024] [--changed 0.01] [--rounds 3] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import base64
import cProfile
import json
import multiprocessing
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchdoc import replace_section  # noqa: E402
from mobility.agent import Agent, DiskAssignment, ItemAssignment  # noqa: E402
from mobility.tuning import tune_allocator  # noqa: E402
from replication.dataplane import digests, process_server, sealing  # noqa: E402
from replication.dataplane.apply import DiskSpec, ReplicaApplier  # noqa: E402
from replication.dataplane.auth import issue_token, item_subject  # noqa: E402
from replication.dataplane.storage import open_storage  # noqa: E402

MiB = 1024 * 1024
BLOCK = 4096


class CountingRelay:
    """A TCP relay that counts the bytes it carries in each direction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, server):  # relay every piece at once, as the endpoints send it
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(256 * 1024):
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0

    def close(self) -> None:
        self._listener.close()


def _worker_main(storage_cfg: dict, key: bytes, item_id: str, size: int, applied, digest_seconds, stop,
                 failed) -> None:
    """The worker's part for one item, in its own process as a Celery worker would run it:
    apply the item's logs, answer digest requests."""
    storage = open_storage(storage_cfg)
    names = {0: f"{item_id}-0"}
    applier = ReplicaApplier(storage, key=key, item_id=item_id, disks={0: DiskSpec(names[0], size)})
    profile = None
    if os.environ.get("LIFEBOAT_BENCH_PROFILE"):
        profile = cProfile.Profile()
    try:
        while not stop.is_set():
            if profile is not None and os.path.exists(os.environ["LIFEBOAT_BENCH_PROFILE"] + ".on"):
                profile.enable()
            t0 = time.perf_counter()
            result = applier.apply_pending(crash_consistent_interval_s=3600)
            if profile is not None and result.batches_applied:
                print(f"worker: applied {result.batches_applied} batches in {time.perf_counter() - t0:.3f} s",
                      file=sys.stderr)
            t = time.perf_counter()
            if digests.digest_request_answer(storage, item_id=item_id, disks=names, applied_seq=result.applied_seq):
                digest_seconds.value += time.perf_counter() - t
            applied.value = result.applied_seq
            if profile is not None:
                profile.disable()
            stop.wait(0.02)
        if profile is not None:
            profile.dump_stats(os.environ["LIFEBOAT_BENCH_PROFILE"])
    except BaseException as e:
        failed.value = 1
        print(f"worker failed: {e!r}", file=sys.stderr)
        raise


class Worker:
    """Runs ``_worker_main`` in a child process."""

    def __init__(self, storage_cfg: dict, *, key: bytes, item_id: uuid.UUID, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = f"{item_id}-0"
        self._applied = ctx.Value("q", 0)
        self._digest_seconds = ctx.Value("d", 0.0)
        self._failed = ctx.Value("i", 0)
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_worker_main, args=(storage_cfg, key, str(item_id), size, self._applied,
                                                            self._digest_seconds, self._stop, self._failed),
                                 daemon=True)
        self._proc.start()

    @property
    def digest_seconds(self) -> float:
        return self._digest_seconds.value

    def wait_applied(self, seq: int, timeout: float = 3600) -> None:
        deadline = time.monotonic() + timeout
        while self._applied.value < seq:
            if self._failed.value or not self._proc.is_alive():
                raise RuntimeError("the worker process failed")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica did not apply seq {seq}")
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._proc.join(timeout=60)


def evict(*paths: str) -> None:
    """Write back and drop from the page cache every file under ``paths``: both resyncs
    start cold, as a real one does (the source disk and the replica are not in memory)."""
    for top in paths:
        files = [top] if os.path.isfile(top) else [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def quiesce() -> None:
    """Let the device finish what the previous step wrote (a virtual disk goes on writing
    after fsync returns) before the next timed run, so neither run pays for the other's."""
    os.sync()
    time.sleep(1.0)


def rsync_run(src: str, dest: str) -> dict:
    rsync = shutil.which("rsync")
    if rsync is None:
        return {"error": "rsync is not installed (Debian package rsync)"}
    t = time.perf_counter()
    out = subprocess.run([rsync, "-I", "--no-whole-file", "--inplace", "--stats", src, dest],
                         capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t

    def figure(name: str) -> int:
        m = re.search(rf"{name}: ([\d,.]+)", out.stdout)
        return int(m.group(1).replace(",", "").replace(".", "")) if m else -1

    sent, received = figure("Total bytes sent"), figure("Total bytes received")
    return {"wire_bytes": sent + received, "bytes_sent": sent, "bytes_received": received,
            "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--changed", type=float, default=0.01, help="share of 4 KiB blocks changed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both, alternating which runs first")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"),
                    help="page whose resync section is replaced with the results ('' to leave it)")
    args = ap.parse_args(argv)
    tune_allocator()
    size = args.size_mib * MiB
    work = tempfile.mkdtemp(prefix="lifeboat-bench-resync-", dir=args.workdir)
    ps_proc = relay = worker = agent = None
    try:
        source = os.path.join(work, "source.img")
        with open(source, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        auth_key, seal_key = os.urandom(32), sealing.new_key()
        storage_cfg = {"kind": "local", "root": os.path.join(work, "storage")}
        cfg = {"listen": "127.0.0.1:0", "cache_dir": os.path.join(work, "ps-cache"),
               "auth_key": base64.b64encode(auth_key).decode(), "seal_key": base64.b64encode(seal_key).decode(),
               "storage": storage_cfg}
        ps_proc = process_server.spawn(cfg, config_path=os.path.join(work, "ps.json"),
                                       log_path=os.path.join(work, "ps.log"), ready_timeout=60)
        relay = CountingRelay(ps_proc.port)
        item_id = uuid.uuid4()
        item = ItemAssignment(item_id, issue_token(auth_key, item_subject(item_id)),
                              f"https://127.0.0.1:{relay.port}", ps_proc.thumbprint,
                              (DiskAssignment(0, "0", source, None),))
        storage = open_storage(storage_cfg)
        worker = Worker(storage_cfg, key=seal_key, item_id=item_id, size=size)
        agent = Agent(state_dir=os.path.join(work, "agent"), assignment=[item], scan_interval=10**9,
                      tick_interval=0)
        t = time.perf_counter()
        status = agent.replicate_until_caught_up(timeout=3600)[str(item_id)]
        worker.wait_applied(status["acked_seq"])
        initial_seconds = time.perf_counter() - t

        # Rounds, Lifeboat and rsync alternating which goes first, each on its own fresh
        # change of the image and each starting cold; the medians are the result.
        rounds = []
        dest = os.path.join(work, "rsync-dest.img")
        rng = random.Random(args.seed)
        blocks = size // BLOCK
        done_seq = 0
        for n in range(args.rounds):
            # A recovery point pins the replica as it is, as in production: the resync's
            # writes go to new chunk versions.
            agent.request_bookmark(item_id, f"before round {n + 1}")
            status = agent.replicate_until_caught_up(timeout=3600)[str(item_id)]
            worker.wait_applied(status["acked_seq"])
            shutil.copyfile(source, dest)  # the destination rsync updates: the image as it was
            changed = sorted(rng.sample(range(blocks), int(blocks * args.changed)))
            with open(source, "r+b") as f:
                for b in changed:
                    f.seek(b * BLOCK)
                    f.write(rng.randbytes(BLOCK))
                f.flush()
                os.fsync(f.fileno())

            def lifeboat_run() -> dict:
                nonlocal done_seq
                evict(source, storage_cfg["root"])
                quiesce()
                relay.reset()
                digest_before = worker.digest_seconds
                if os.environ.get("LIFEBOAT_BENCH_PROFILE"):  # profile the worker from here on
                    open(os.environ["LIFEBOAT_BENCH_PROFILE"] + ".on", "w").close()
                agent_profile = cProfile.Profile() if os.environ.get("LIFEBOAT_BENCH_PROFILE") else None
                t = time.perf_counter()
                agent.request_resync(item_id)
                while True:
                    if agent_profile is not None:
                        agent_profile.enable()
                    status = agent.run_once(flush=True)[str(item_id)]
                    if agent_profile is not None:
                        agent_profile.disable()
                    if (status["phase"] == "delta" and (status["pass_done_seq"] or 0) > done_seq
                            and status["acked_seq"] >= status["pass_done_seq"]):
                        break
                    time.sleep(0.01)
                if agent_profile is not None:
                    agent_profile.dump_stats(os.environ["LIFEBOAT_BENCH_PROFILE"] + ".agent")
                acked_seconds = time.perf_counter() - t  # the whole pass durable at the process server
                worker.wait_applied(status["pass_done_seq"])
                seconds = time.perf_counter() - t
                done_seq = status["pass_done_seq"]
                if os.environ.get("LIFEBOAT_BENCH_PROFILE"):
                    os.unlink(os.environ["LIFEBOAT_BENCH_PROFILE"] + ".on")
                wire = relay.up + relay.down
                with open(source, "rb") as f:
                    exact = all(storage.read_disk(worker.name, off, min(64 * MiB, size - off)) == f.read(64 * MiB)
                                for off in range(0, size, 64 * MiB))
                return {"wire_bytes": wire, "bytes_to_process_server": relay.up,
                        "bytes_from_process_server": relay.down, "seconds": round(seconds, 3),
                        "seconds_until_acknowledged": round(acked_seconds, 3),
                        "replica_digest_seconds": round(worker.digest_seconds - digest_before, 3),
                        "data_bytes_sent": status["sent_bytes"], "byte_exact": exact}

            def rsync_round() -> dict:
                evict(source, dest)
                quiesce()
                return rsync_run(source, dest)

            if n % 2 == 0:
                lb = lifeboat_run()
                rs = rsync_round()
            else:
                rs = rsync_round()
                lb = lifeboat_run()
            rounds.append({"round": n + 1, "first": "lifeboat" if n % 2 == 0 else "rsync",
                           "changed_blocks": len(changed), "lifeboat": lb, "rsync": rs})
            print(f"round {n + 1}: lifeboat {lb['seconds']:.2f} s, {lb['wire_bytes'] / 1e6:.2f} MB; "
                  f"rsync {rs.get('seconds', float('nan')):.2f} s", file=sys.stderr)

        def median(values: list[float]) -> float:
            return statistics.median(values) if values else float("nan")

        lb_s = median([r["lifeboat"]["seconds"] for r in rounds])
        rs_times = [r["rsync"]["seconds"] for r in rounds if isinstance(r["rsync"].get("seconds"), float)]
        rs_s = median(rs_times) if rs_times else None
        wire = max(r["lifeboat"]["wire_bytes"] for r in rounds)
        exact = all(r["lifeboat"]["byte_exact"] for r in rounds)
        result = {
            "image_bytes": size, "changed_blocks": rounds[0]["changed_blocks"],
            "changed_bytes": rounds[0]["changed_blocks"] * BLOCK,
            "initial_copy_seconds": round(initial_seconds, 3),
            "median": {"lifeboat_seconds": round(lb_s, 3), "rsync_seconds": round(rs_s, 3) if rs_s else None,
                       "lifeboat_seconds_until_acknowledged":
                           round(median([r["lifeboat"]["seconds_until_acknowledged"] for r in rounds]), 3),
                       "lifeboat_replica_digest_seconds":
                           round(median([r["lifeboat"]["replica_digest_seconds"] for r in rounds]), 3),
                       "lifeboat_wire_bytes": int(median([r["lifeboat"]["wire_bytes"] for r in rounds])),
                       "rsync_wire_bytes": int(median([r["rsync"].get("wire_bytes", 0) for r in rounds]))},
            "rounds": rounds,
            "targets": {"wire_bytes_at_most": 16_000_000, "wire_ok": wire <= 16_000_000,
                        "time_ok": rs_s is not None and lb_s <= rs_s},
        }
        print(json.dumps(result, indent=2))
        if args.doc:
            write_doc(args.doc, result, size_mib=args.size_mib, share=args.changed)
        return 0 if exact else 1
    finally:
        if agent is not None:
            agent.close()
        if worker is not None:
            worker.close()
        if relay is not None:
            relay.close()
        if ps_proc is not None:
            ps_proc.stop()
        shutil.rmtree(work, ignore_errors=True)


SECTION = "## Resynchronization against rsync"


def write_doc(path: str, r: dict, *, size_mib: int, share: float) -> None:
    import datetime

    med = r["median"]
    n = len(r["rounds"])
    lines = [
        SECTION,
        "",
        f"Written by `python bench/bench_resync.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({os.cpu_count()} CPUs; load average at the end {os.getloadavg()[0]:.2f}). A {size_mib} MiB image of random "
        f"bytes, replicated. Then {n} rounds: in each, a recovery point is cut (so the resync's writes go to new "
        f"chunk versions, as in production), {share:.0%} of the image's 4 KiB blocks ({r['changed_blocks']}) are "
        "changed at random places, and both run on that change: Lifeboat resynchronizes the item (the agent compares "
        "the source with digests read from the replica and sends the blocks that differ) and rsync "
        "(`rsync -I --no-whole-file --inplace`, between two local paths over its own protocol) updates a copy of the "
        "image as it was before the change. Which of the two runs first alternates from round to round, and both "
        "start cold: the source image, the replica and rsync's copy are written back and dropped from the page cache "
        "first (`posix_fadvise(DONTNEED)`), as they are on a real machine when a resync starts, and the device is "
        "given a second to finish earlier writes. Lifeboat's time runs "
        "until the replica has applied the pass; its bytes on the wire are counted on the agent's TLS connection, "
        "both ways; rsync's are its \"Total bytes sent\" plus \"Total bytes received\". The result is the median of "
        "the rounds.",
        "",
        "| round (first) | Lifeboat: wall time | acknowledged | replica digests | bytes on the wire "
        "| replica equals source | rsync: wall time | bytes on the wire |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rd in r["rounds"]:
        lb, rs = rd["lifeboat"], rd["rsync"]
        rs_s = rs.get("seconds")
        lines.append(
            f"| {rd['round']} ({rd['first']}) | {lb['seconds']:.2f} s | {lb['seconds_until_acknowledged']:.2f} s | "
            f"{lb['replica_digest_seconds']:.2f} s | {lb['wire_bytes'] / 1e6:.2f} MB | "
            f"{'yes' if lb['byte_exact'] else 'NO'} | "
            + (f"{rs_s:.2f} s" if isinstance(rs_s, float) else str(rs.get("error", "not run")))
            + f" | {rs.get('wire_bytes', 0) / 1e6:.2f} MB |")
    rs_med = med["rsync_seconds"]
    lines += [
        f"| **median** | **{med['lifeboat_seconds']:.2f} s** | {med['lifeboat_seconds_until_acknowledged']:.2f} s | "
        f"{med['lifeboat_replica_digest_seconds']:.2f} s | {med['lifeboat_wire_bytes'] / 1e6:.2f} MB | | "
        + (f"**{rs_med:.2f} s**" if rs_med is not None else "not run")
        + f" | {med['rsync_wire_bytes'] / 1e6:.2f} MB |",
        "",
        f"Targets: bytes on the wire at most 16 MB in every round: {'met' if r['targets']['wire_ok'] else 'not met'}; "
        f"median wall time no longer than rsync's: {'met' if r['targets']['time_ok'] else 'not met'}.",
    ]
    replace_section(path, SECTION, lines)


if __name__ == "__main__":
    sys.exit(main())
