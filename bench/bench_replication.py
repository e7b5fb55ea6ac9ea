"""Replication throughput benchmark: agent -> process server -> storage -> replica disk.

One run on one machine measures, on the same data (a disk image whose blocks are half
random bytes, half operating-system file contents):

* the raw speed of each stage, single-threaded: zstd level 1, AES-256-GCM, fsync'd writes,
  and the raw serial pipeline (zstd + AES-GCM + fsync'd write, one chunk after the other);
* end-to-end replication: a mobility agent (this process) makes the initial copy of the disk
  over HTTPS to a process server (its own process), which caches, seals and uploads it to
  local storage, while the apply engine (its own process) writes the replica disk; the clock
  stops when the replica holds the last batch, and the replica is then checked byte for byte;
* the peak resident size of the process server while a backlog several times larger than
  its memory bound is pushed by several agents at once.

It prints one ``name: value unit`` line per figure and writes docs/BENCHMARKS.md.

    python bench/bench_replication.py [--size-mib 1024] [--backlog-mib 1536] [--repeat 3] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import psutil  # noqa: E402
import zstandard  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from benchdoc import sections_after_head  # noqa: E402
from mobility.agent import Agent, DiskAssignment, ItemAssignment  # noqa: E402
from mobility.tuning import tune_allocator  # noqa: E402
from replication.dataplane import process_server  # noqa: E402
from replication.dataplane import sealing  # noqa: E402
from replication.dataplane.auth import issue_token, item_subject  # noqa: E402

MiB = 1024 * 1024
CHUNK = 8 * MiB
MIX_BLOCK = 256 * 1024
RSS_BOUND = 256 * MiB


# --- data -----------------------------------------------------------------------------------


def _os_files_pool(size: int) -> bytes:
    """Compressible bytes as a VM disk holds them: the contents of this machine's own
    operating-system files (Python's standard library sources and shared libraries),
    topped up with generated log lines if there are not enough of them."""
    import glob

    lib = os.path.dirname(os.__file__)
    paths = sorted(glob.glob(os.path.join(lib, "**", "*.py"), recursive=True))
    paths += sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")) + sorted(glob.glob(os.path.join(lib, "lib-dynload", "*.so")))
    out = bytearray()
    half = size // 2
    for group in (paths[: len(paths) // 2], paths[len(paths) // 2 :]):
        taken = 0
        for path in group:
            try:
                with open(path, "rb") as f:
                    data = f.read(half - taken)
            except OSError:
                continue
            out += data
            taken += len(data)
            if taken >= half:
                break
    rng = random.Random(3)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    t = 1_700_000_000
    while len(out) < size:
        t += rng.randint(0, 3)
        out += b"%d host%02d svc[%d]: " % (t, rng.randint(0, 20), rng.randint(100, 999))
        out += b" ".join(rng.choices(words, k=rng.randint(4, 14))) + b"\n"
    return bytes(out[:size])


def make_disk(path: str, size: int, *, seed: int = 7) -> None:
    """Half of the 256 KiB blocks random bytes, half operating-system file contents, in
    random order; fsync'd."""
    rng = random.Random(seed)
    pool = _os_files_pool(32 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // MIX_BLOCK):
            if rng.random() < 0.5:
                f.write(os.urandom(MIX_BLOCK))
            else:
                o = rng.randrange(0, len(pool) - MIX_BLOCK)
                f.write(pool[o : o + MIX_BLOCK])
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- raw stages -------------------------------------------------------------------------------


def raw_stages(disk: str, workdir: str, sample: int) -> dict[str, float]:
    """MB/s of each stage alone on the first ``sample`` bytes of the disk (in memory)."""
    with open(disk, "rb") as f:
        chunks = [f.read(CHUNK) for _ in range(sample // CHUNK)]
    total = sum(len(c) for c in chunks)
    key = sealing.new_key()
    out: dict[str, float] = {}

    comp = zstandard.ZstdCompressor(level=1)
    t = time.perf_counter()
    compressed = [comp.compress(c) for c in chunks]
    out["zstd1"] = total / (time.perf_counter() - t)
    out["ratio"] = sum(len(c) for c in compressed) / total

    aes = AESGCM(key)
    t = time.perf_counter()
    for c in chunks:
        aes.encrypt(os.urandom(12), c, b"ctx")
    out["aesgcm"] = total / (time.perf_counter() - t)

    path = os.path.join(workdir, "raw-write.bin")
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for c in chunks:
        os.write(fd, c)
        os.fsync(fd)
    os.close(fd)
    out["write_fsync"] = total / (time.perf_counter() - t)
    os.unlink(path)

    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for i, c in enumerate(chunks):
        os.write(fd, sealing.seal(c, key=key, context=f"bench:{i}".encode()))
        os.fsync(fd)
    os.close(fd)
    out["serial_pipeline"] = total / (time.perf_counter() - t)
    os.unlink(path)
    return out


# --- end to end ---------------------------------------------------------------------------------


def _applier(storage_root: str, seal_key: bytes, item_id: str, size: int, target: multiprocessing.Value,
             done: multiprocessing.Value, stop: multiprocessing.Event) -> None:
    """The apply engine in its own process: apply logs as they come, until ``target``."""
    from replication.dataplane.apply import DiskSpec, ReplicaApplier
    from replication.dataplane.storage import open_storage

    tune_allocator()  # as the Celery worker that runs apply tasks does

    storage = open_storage({"kind": "local", "root": storage_root})
    applier = ReplicaApplier(storage, key=seal_key, item_id=item_id, disks={0: DiskSpec("bench-replica", size)},
                             checkpoint_bytes=256 * MiB)
    while not stop.is_set():
        result = applier.apply_pending(crash_consistent_interval_s=3600)
        if result.errors:
            raise SystemExit(f"apply failed: {result.errors}")
        done.value = result.applied_seq
        if target.value and result.applied_seq >= target.value:
            return
        # A pass ends with a flush of the replica disks: like a worker's apply task, run
        # passes on a cadence rather than one per log as soon as it lands.
        time.sleep(0.25 if target.value == 0 else 0.05)


class _RssWatch:
    """Peak resident size of a process, sampled every 20 ms (the process server has no
    child processes; its uploaders are threads)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                pass
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _ps_config(workdir: str, name: str, auth_key: bytes, seal_key: bytes, **extra) -> dict:
    cfg = {
        "listen": "127.0.0.1:0",
        "cache_dir": os.path.join(workdir, f"{name}-cache"),
        "auth_key": base64.b64encode(auth_key).decode(),
        "seal_key": base64.b64encode(seal_key).decode(),
        "storage": {"kind": "local", "root": os.path.join(workdir, f"{name}-storage")},
    }
    cfg.update(extra)
    return cfg


def end_to_end(disk: str, size: int, workdir: str) -> dict[str, float]:
    auth_key, seal_key = os.urandom(32), sealing.new_key()
    cfg = _ps_config(workdir, "e2e", auth_key, seal_key)
    ps = process_server.spawn(cfg, config_path=os.path.join(workdir, "e2e.json"),
                              log_path=os.path.join(workdir, "e2e-ps.log"))
    item_id = uuid.uuid4()
    ctx = multiprocessing.get_context("spawn")
    target, done, stop = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Event()
    applier = ctx.Process(target=_applier, args=(cfg["storage"]["root"], seal_key, str(item_id), size, target, done,
                                                  stop), daemon=True)
    applier.start()
    rss = _RssWatch(ps.pid)
    assignment = ItemAssignment(item_id, issue_token(auth_key, item_subject(item_id)), ps.url, ps.thumbprint,
                                (DiskAssignment(0, "disk0", disk, None),))
    agent = Agent(state_dir=os.path.join(workdir, "e2e-agent"), assignment=[assignment], scan_interval=1e9)
    procs = {"agent": psutil.Process(), "process_server": psutil.Process(ps.pid), "apply": psutil.Process(applier.pid)}
    used0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
    cpu0 = psutil.cpu_times()
    t0 = time.perf_counter()
    try:
        agent.run_once()
        status = agent.status()[0]
        if status["phase"] != "delta" or status["last_error"]:
            raise SystemExit(f"initial replication did not finish: {status}")
        t_acked = time.perf_counter() - t0
        target.value = status["acked_seq"]
        deadline = time.monotonic() + 600
        while done.value < target.value:
            if not applier.is_alive():
                raise SystemExit("the apply process died")
            if time.monotonic() > deadline:
                raise SystemExit("the replica did not catch up within 10 minutes")
            time.sleep(0.01)
        t_applied = time.perf_counter() - t0
        cpu1 = psutil.cpu_times()
        used = {k: sum(p.cpu_times()[:2]) - used0[k] for k, p in procs.items()}
    finally:
        peak = rss.stop()
        stop.set()
        applier.join(30)
        agent.close()
        ps.stop()
    replica = _replica_sha256(cfg["storage"]["root"], size)
    source = sha256_file(disk)
    if replica != source:
        raise SystemExit(f"replica sha256 {replica} differs from the source {source}")
    busy = (cpu1.user + cpu1.system - cpu0.user - cpu0.system)
    gib = size / 1024**3
    return {
        "e2e": size / t_applied,
        "ingest": size / t_acked,
        "seconds": t_applied,
        "ps_rss": peak,
        "cpu_busy": busy / (t_applied * psutil.cpu_count()),
        # an idle core while I/O is pending, and time the hypervisor gave to other guests
        "cpu_iowait": (getattr(cpu1, "iowait", 0) - getattr(cpu0, "iowait", 0)) / (t_applied * psutil.cpu_count()),
        "cpu_steal": (getattr(cpu1, "steal", 0) - getattr(cpu0, "steal", 0)) / (t_applied * psutil.cpu_count()),
        "cpu_per_gib": {k: v / gib for k, v in used.items()},
    }


def _replica_sha256(storage_root: str, size: int) -> str:
    from replication.dataplane.storage import open_storage

    storage = open_storage({"kind": "local", "root": storage_root})
    h = hashlib.sha256()
    for chunk in storage.iter_disk("bench-replica", chunk_bytes=CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _push_agent(state_dir: str, assignment: dict) -> None:
    """One agent process (its own VM, as it were): the initial copy of its disk."""
    tune_allocator()
    item = ItemAssignment.from_dict(assignment)
    agent = Agent(state_dir=state_dir, assignment=[item], scan_interval=1e9)
    status = agent.run_once()[str(item.item_id)]
    agent.close()
    if status["phase"] != "delta" or status["last_error"]:
        raise SystemExit(f"initial replication did not finish: {status}")


def backlog_rss(workdir: str, total: int, *, agents: int = 4) -> dict[str, float]:
    """Several agent processes push at once into one process server whose storage is out of
    reach, so everything they send piles up in its cache; then storage comes back and the
    backlog drains. Returns the server's peak RSS over both phases."""
    auth_key, seal_key = os.urandom(32), sealing.new_key()
    cfg = _ps_config(workdir, "backlog", auth_key, seal_key)
    # A file where the logs directory must go: every upload fails (and is retried) until it
    # is removed, as when cache storage is unreachable.
    blocker = os.path.join(cfg["storage"]["root"], "objects", "logs")
    os.makedirs(os.path.dirname(blocker), exist_ok=True)
    with open(blocker, "wb") as fh:
        fh.write(b"storage unreachable")
    ps = process_server.spawn(cfg, config_path=os.path.join(workdir, "backlog.json"),
                              log_path=os.path.join(workdir, "backlog-ps.log"))
    try:
        per = total // agents // MiB * MiB
        ctx = multiprocessing.get_context("spawn")
        procs = []
        for n in range(agents):
            path = os.path.join(workdir, f"backlog-disk{n}.img")
            make_disk(path, per, seed=100 + n)
            item_id = uuid.uuid4()
            a = ItemAssignment(item_id, issue_token(auth_key, item_subject(item_id)), ps.url, ps.thumbprint,
                               (DiskAssignment(0, "disk0", path, None),))
            procs.append(ctx.Process(target=_push_agent, args=(os.path.join(workdir, f"backlog-agent{n}"), a.to_dict())))

        def pending() -> int:
            total = 0
            for d, _s, fs in os.walk(os.path.join(cfg["cache_dir"], "items")):
                for f in fs:
                    if f.endswith(process_server.OBJECT_SUFFIX):
                        try:
                            total += os.path.getsize(os.path.join(d, f))
                        except FileNotFoundError:  # uploaded and dropped meanwhile
                            pass
            return total

        rss = _RssWatch(ps.pid)
        peak_pending = 0
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            try:
                peak_pending = max(peak_pending, pending())
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        pushed = time.perf_counter() - t0
        peak_pending = max(peak_pending, pending())
        errors = [f"agent process {n} exited with code {p.exitcode}" for n, p in enumerate(procs) if p.exitcode]
        os.unlink(blocker)
        deadline = time.monotonic() + 600
        while pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        if pending():
            errors.append("the backlog did not drain within 10 minutes")
        peak = rss.stop()
    finally:
        ps.stop()
    if errors:
        raise SystemExit(f"backlog push failed: {errors}")
    return {"rss": peak, "pushed": per * agents, "peak_pending": peak_pending, "ingest": per * agents / pushed}


# --- report ---------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            load = f.read().split()[0]
    except OSError:
        load = "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{psutil.virtual_memory().total / 1024**3:.1f} GiB",
        "python": platform.python_version(),
        "load": load,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="disk image size for the end-to-end run")
    parser.add_argument("--backlog-mib", type=int, default=1536, help="backlog pushed for the RSS figure")
    parser.add_argument("--sample-mib", type=int, default=256, help="data used for the raw stage speeds")
    parser.add_argument("--workdir", help="scratch directory (default: a temp dir, removed at the end)")
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--repeat", type=int, default=3,
                        help="raw stages + end-to-end runs, interleaved; the median run is reported")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    # This process is the agent of the end-to-end run, tuned as `python -m mobility run` is;
    # the raw stages run in it too, under the same allocator.
    tune_allocator()
    size = args.size_mib * MiB
    workdir = args.workdir or tempfile.mkdtemp(prefix="lifeboat-bench-", dir=os.path.join(ROOT, "var")
                                               if os.path.isdir(os.path.join(ROOT, "var")) else None)
    os.makedirs(workdir, exist_ok=True)
    try:
        info = machine()
        disk = os.path.join(workdir, "source.img")
        make_disk(disk, size)
        runs: list[tuple[dict, dict]] = []
        for n in range(args.repeat):
            # Interleaved, so that each end-to-end run has a baseline taken moments before it
            # on the same machine: on a shared host both drift by tens of percent.
            run_dir = os.path.join(workdir, f"run{n}")
            os.makedirs(run_dir)
            raw_n = raw_stages(disk, run_dir, min(size, args.sample_mib * MiB))
            runs.append((raw_n, end_to_end(disk, size, run_dir)))
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"run {n + 1}: e2e {runs[-1][1]['e2e'] / 1e6:.0f} MB/s, "
                  f"raw serial pipeline {raw_n['serial_pipeline'] / 1e6:.0f} MB/s", flush=True)
        raw, e2e = sorted(runs, key=lambda r: r[1]["e2e"])[len(runs) // 2]  # the median run
        backlog = backlog_rss(workdir, args.backlog_mib * MiB)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    figures = [
        ("raw_zstd1", raw["zstd1"] / 1e6, "MB/s"),
        ("raw_aes256gcm", raw["aesgcm"] / 1e6, "MB/s"),
        ("raw_fsync_write", raw["write_fsync"] / 1e6, "MB/s"),
        ("raw_serial_pipeline", raw["serial_pipeline"] / 1e6, "MB/s"),
        ("zstd1_ratio", raw["ratio"], "compressed/plain"),
        ("e2e_replication", e2e["e2e"] / 1e6, "MB/s"),
        ("e2e_vs_serial_pipeline", 100 * e2e["e2e"] / raw["serial_pipeline"], "%"),
        ("agent_to_process_server", e2e["ingest"] / 1e6, "MB/s"),
        ("e2e_cpu_busy", 100 * e2e["cpu_busy"], "% of all cores"),
        ("e2e_cpu_iowait", 100 * e2e["cpu_iowait"], "% of all cores"),
        ("e2e_cpu_steal", 100 * e2e["cpu_steal"], "% of all cores"),
        ("cpu_agent", e2e["cpu_per_gib"]["agent"], "CPU-s/GiB"),
        ("cpu_process_server", e2e["cpu_per_gib"]["process_server"], "CPU-s/GiB"),
        ("cpu_apply", e2e["cpu_per_gib"]["apply"], "CPU-s/GiB"),
        ("ps_peak_rss_e2e", e2e["ps_rss"] / MiB, "MiB"),
        ("ps_peak_rss_backlog", backlog["rss"] / MiB, "MiB"),
        ("backlog_pushed", backlog["pushed"] / MiB, "MiB"),
        ("backlog_peak_cached", backlog["peak_pending"] / MiB, "MiB"),
        ("backlog_ingest", backlog["ingest"] / 1e6, "MB/s"),
    ]
    for name, value, unit in figures:
        print(f"{name}: {value:.2f} {unit}" if unit != "MB/s" else f"{name}: {value:.0f} {unit}")
    if not args.no_doc:
        write_doc(args.doc, info, args, figures, e2e, raw, backlog, runs)
    return 0


def write_doc(path: str, info: dict, args, figures, e2e, raw, backlog, runs) -> None:
    f = dict((n, v) for n, v, _u in figures)
    targets = [
        ("end-to-end replication", f"{f['e2e_replication']:.0f} MB/s", ">= 200 MB/s",
         f["e2e_replication"] >= 200),
        ("end-to-end / raw serial pipeline", f"{f['e2e_vs_serial_pipeline']:.0f} %", ">= 40 %",
         f["e2e_vs_serial_pipeline"] >= 40),
        ("process server peak RSS (backlog)", f"{f['ps_peak_rss_backlog']:.0f} MiB", "< 256 MiB",
         f["ps_peak_rss_backlog"] < 256),
    ]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench`: `python bench/bench_replication.py` writes this part of the page; the sections",
        "after it belong to `bench/bench_rto.py` and `bench/bench_resync.py`, each replacing only its own.",
        "Ratios compare figures measured in the same run, on the same data.",
        "",
        "## Machine",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- nproc: {info['nproc']}",
        f"- CPU: {info['cpu']}",
        f"- memory: {info['memory']}",
        f"- Python: {info['python']}",
        f"- load average (1 min) at start: {info['load']}",
        "",
        "## Data",
        "",
        f"A {args.size_mib} MiB disk image of 256 KiB blocks in random order, half random bytes and half "
        "operating-system file contents (Python sources and shared libraries of the machine), so "
        f"zstd level 1 makes the whole {f['zstd1_ratio']:.2f} of its size. Raw stage speeds use its "
        f"first {args.sample_mib} MiB in 8 MiB chunks, single-threaded.",
        "",
        "## Results",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    for name, value, unit in figures:
        lines.append(f"| {name} | {value:.2f} {unit} |" if unit != "MB/s" else f"| {name} | {value:.0f} {unit} |")
    lines += [
        "",
        f"The figures above are those of the median of {len(runs)} runs by end-to-end rate (raw stages, "
        "then end to end, interleaved); every run:",
        "",
        "| run | raw serial pipeline | end to end | ratio | cores busy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, (raw_n, e2e_n) in enumerate(runs, 1):
        lines.append(f"| {n} | {raw_n['serial_pipeline'] / 1e6:.0f} MB/s | {e2e_n['e2e'] / 1e6:.0f} MB/s | "
                     f"{100 * e2e_n['e2e'] / raw_n['serial_pipeline']:.0f} % | {100 * e2e_n['cpu_busy']:.0f} % |")
    lines += [
        "",
        "## Against the targets",
        "",
        "| target | measured | goal | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, measured, goal, ok in targets:
        lines.append(f"| {name} | {measured} | {goal} | {'yes' if ok else 'no'} |")
    cpu_sum = f["cpu_agent"] + f["cpu_process_server"] + f["cpu_apply"]
    bound = int(info["nproc"]) / cpu_sum * 1024**3 / 1e6 if cpu_sum else 0
    lines += [
        "",
        "## Reading the figures",
        "",
        f"The three processes spent {cpu_sum:.1f} CPU-seconds per GiB between them (agent "
        f"{f['cpu_agent']:.1f}, process server {f['cpu_process_server']:.1f}, apply {f['cpu_apply']:.1f}), so "
        f"{info['nproc']} cores could carry at most about {bound:.0f} MB/s end to end even fully busy; the run "
        f"reached {f['e2e_replication']:.0f} MB/s with the cores {f['e2e_cpu_busy']:.0f} % busy; of the rest, "
        f"{f['e2e_cpu_iowait']:.0f} % were cores idle while disk I/O was pending and {f['e2e_cpu_steal']:.0f} % "
        "went to other guests of the host. The process server's share is mostly zstd (level 1, one "
        "batch at a time), then TLS, AES-GCM and the batch checksum; the agent's is TLS, reading the disk, "
        "the BLAKE3 block map and the batch checksum; the apply engine's is zstd decompression, AES-GCM "
        "and copying whole chunks into aligned buffers for direct writes. Work of other tenants of a "
        "shared machine slows every figure: compare ratios within one run rather than figures across runs.",
    ]
    lines += [
        "",
        "## What is measured",
        "",
        "- `raw_*`: one stage alone in one thread: zstd level 1 compression, AES-256-GCM "
        "encryption, writing 8 MiB chunks with an fsync after each, and the serial pipeline "
        "(seal = zstd + AES-GCM, then write + fsync) chunk after chunk.",
        "- `e2e_replication`: the initial replication of the image, from the agent's first read to the "
        "replica disk holding the last batch: the agent (this process) reads, hashes (block map) and "
        "ships 8 MiB batches over HTTPS with three in flight; the process server (own process) validates "
        "each batch as it arrives, seals it, writes the sealed object to its cache (O_DIRECT) and fsyncs "
        "it before acknowledging it, then links it into local storage; the apply engine (own process) "
        "reads each log (O_DIRECT), unseals and decodes it and writes the replica disk (whole chunks with "
        "O_DIRECT, in the background). The replica's SHA-256 is checked against the source after the "
        "clock stops.",
        "- `agent_to_process_server`: the same run, up to the agent's last acknowledgement.",
        "- `e2e_cpu_iowait`, `e2e_cpu_steal`: share of all cores idle with I/O pending, and taken by "
        "the hypervisor for other guests, during the same run.",
        "- `e2e_cpu_busy`: share of all cores busy during the end-to-end run (every process on the "
        "machine, so other work on a shared machine shows here).",
        "- `cpu_*`: CPU time (user + system) each of the three processes spent per GiB replicated during "
        "the end-to-end run; their sum over the number of cores bounds the end-to-end rate.",
        "- `ps_peak_rss_*`: peak resident size of the process server process, sampled "
        f"every 20 ms; the backlog run pushes {backlog['pushed'] // MiB} MiB from four agent processes at "
        "once (their initial copies) while its cache storage is unreachable, so all of it piles up in "
        "its cache (`backlog_peak_cached`, sealed bytes), then storage comes back and the backlog drains; "
        "the peak covers both phases.",
        "",
    ]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keep = ""
    if os.path.exists(path):  # the RTO benchmark's section (bench_rto.py) is its own
        with open(path) as fh:
            old = fh.read()
        keep = sections_after_head(old)  # the other benchmarks' sections are theirs
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + ("\n" + keep if keep else ""))



if __name__ == "__main__":
    sys.exit(main())
