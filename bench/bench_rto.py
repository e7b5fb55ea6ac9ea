"""Recovery time (RTO) benchmark: replica snapshot -> running, verified VM on the simulated
recovery site, with local storage.

The clock runs from the start of the recovery to "running and verified", and covers what a
failover does after its point is chosen: each disk's digest as of the point, read from the
replica snapshot (``snapshot_digests``, which ``point_disk_digests`` calls for the point's
snapshots); the export of each snapshot into the recovered VM's disk file (sparse, in the
kernel); reading every disk back from the site and comparing digests; registering the VM
and powering it on. The replica's chunk files are dropped from the page cache before each
timed run (as the apply engine leaves them: written with O_DIRECT or dropped after fsync),
so the replica is read from the device, as at a real failover.

Two runs, each on fresh replicas fully written with incompressible data:

* one VM with two disks of ``--disk-mib`` (default 1024 MiB each);
* ``--vms`` VMs at once (default 20), each with two disks of ``--many-disk-mib`` (default
  256 MiB, to keep the run short on a small machine), through a thread pool of
  ``--workers`` (default 4: each VM already builds its two disks in parallel, and every
  hash uses all cores).

Each run also measures a baseline on the same bytes, cold as well: a plain sequential copy
of the replica's data into one file per disk (read + write, like ``cp``, fsync'd), which is
the least any recovery must do, and prints the ratio. The one-VM run then times each stage
on its own (``stages_s``: the bare cold read of the replica, the snapshot digest, the
export, the read-back digest, the fsync) to show where the time goes. Prints one JSON
document.

    python bench/bench_rto.py [--disk-mib 1024] [--vms 20] [--many-disk-mib 256] [--workers 4]
                              [--only one|many] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchdoc import replace_section  # noqa: E402
from replication.dataplane.recovery import RecoveryDisk, snapshot_digests  # noqa: E402
from replication.dataplane.storage.base import digest_flat_file  # noqa: E402
from replication.dataplane.storage.local import LocalStorage  # noqa: E402
from vault.connectors.sites import open_recovery_site  # noqa: E402

MiB = 1024 * 1024
TARGET_ONE_S = 5.0
TARGET_MANY_S = 30.0
_RANDOM = os.urandom(8 * MiB)


def fill_disk(storage: LocalStorage, name: str, size: int, seed: int) -> None:
    """Write the whole disk with incompressible data (every MiB different), then flush."""
    storage.create_disk(name, size)
    piece = bytearray(4 * MiB)
    offset = 0
    n = seed * 1_000_003
    while offset < size:
        take = min(len(piece), size - offset)
        start = (n * 4096) % (len(_RANDOM) - len(piece))
        piece[:] = _RANDOM[start : start + len(piece)]
        for m in range(0, take, MiB):  # a distinct header in every MiB: no two chunks alike
            piece[m : m + 16] = n.to_bytes(8, "little") + m.to_bytes(8, "little")
        storage.write_disk(name, offset, memoryview(piece)[:take])
        offset += take
        n += 1
    storage.flush_disk(name)


def drop_cache(storage: LocalStorage, names: list[str]) -> None:
    for name in names:
        for path in storage.chunk_files(name):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def baseline_copy(storage: LocalStorage, name: str, dest: str) -> int:
    """Read the disk's chunk files in order and write them into one file: a plain copy."""
    buf = mmap.mmap(-1, storage.chunk_bytes)  # page-aligned, as cp's buffers are
    view = memoryview(buf)
    files = sorted(storage.chunk_files(name), key=lambda p: int(os.path.basename(p).split(".")[0]))
    total = 0
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for path in files:
            idx = int(os.path.basename(path).split(".")[0])
            fd = os.open(path, os.O_RDONLY)
            try:
                n = os.readv(fd, [view])
            finally:
                os.close(fd)
            os.pwrite(out, view[:n], idx * storage.chunk_bytes)
            total += n
        os.fsync(out)
    finally:
        os.close(out)
        view.release()
        buf.close()
    return total


def run(workdir: str, *, vms: int, disk_bytes: int, workers: int, label: str) -> dict:
    storage = LocalStorage(os.path.join(workdir, f"storage-{label}"))
    site_dir = os.path.join(workdir, f"site-{label}")
    specs = []  # per VM: [(disk name, snapshot)]
    t = time.perf_counter()
    for v in range(vms):
        disks = []
        for i in range(2):
            name = f"{label}-vm{v:02d}-d{i}"
            fill_disk(storage, name, disk_bytes, seed=v * 2 + i + 1)
            disks.append((name, storage.snapshot_disk(name)))
        specs.append(disks)
    setup_s = time.perf_counter() - t
    names = [n for disks in specs for n, _ in disks]
    total_bytes = vms * 2 * disk_bytes

    # Baseline: a plain copy of the same bytes, cold, with the same parallelism.
    drop_cache(storage, names)
    base_dir = os.path.join(workdir, f"baseline-{label}")
    os.makedirs(base_dir)
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(2, min(workers * 2, len(names)))) as pool:
        copied = sum(pool.map(lambda n: baseline_copy(storage, n, os.path.join(base_dir, n + ".img")), names))
    baseline_s = time.perf_counter() - t
    assert copied == total_bytes, (copied, total_bytes)
    shutil.rmtree(base_dir)

    drop_cache(storage, names)
    timings: list[dict] = []

    def recover(v: int) -> dict:
        start = time.perf_counter()
        with open_recovery_site("simulated", data_dir=site_dir, networks=["recovery-net", "test-net"]) as site:
            digests = snapshot_digests(storage, dict(enumerate(specs[v])))
            digested = time.perf_counter()
            disks = [RecoveryDisk(index=i, size_bytes=digests[i].size_bytes, storage=storage, disk_name=name,
                                  snapshot=sid, expected=digests[i]) for i, (name, sid) in enumerate(specs[v])]
            info = site.create_vm(name=f"{label}-vm{v:02d}", network="recovery-net", disks=disks)
        end = time.perf_counter()
        assert info.power_state == "poweredOn" and len(info.disks) == 2
        assert all(d.digest == digests[d.index].digest for d in info.disks)
        return {"vm": info.name, "digest_s": digested - start, "build_verify_power_on_s": end - digested,
                "total_s": end - start, "methods": sorted({d.method for d in info.disks})}

    t = time.perf_counter()
    if vms == 1:
        timings.append(recover(0))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            timings.extend(pool.map(recover, range(vms)))
    rto_s = time.perf_counter() - t
    stages = stage_breakdown(storage, specs[0], workdir) if vms == 1 else None
    storage.close()
    out = {
        "vms": vms,
        "disks_per_vm": 2,
        "disk_mib": disk_bytes // MiB,
        "total_mib": total_bytes // MiB,
        "workers": workers if vms > 1 else 1,
        "rto_s": round(rto_s, 3),
        "rto_mb_per_s": round(total_bytes / rto_s / 1e6, 1),
        "slowest_vm_s": round(max(x["total_s"] for x in timings), 3),
        "digest_s_max": round(max(x["digest_s"] for x in timings), 3),
        "build_verify_power_on_s_max": round(max(x["build_verify_power_on_s"] for x in timings), 3),
        "methods": sorted({m for x in timings for m in x["methods"]}),
        "baseline_plain_copy_s": round(baseline_s, 3),
        "baseline_mb_per_s": round(total_bytes / baseline_s / 1e6, 1),
        "rto_over_baseline": round(rto_s / baseline_s, 2),
        "setup_s": round(setup_s, 1),
    }
    if stages is not None:
        out["stages_s"] = stages
    return out


def stage_breakdown(storage: LocalStorage, disks: list[tuple[str, str]], workdir: str) -> dict:
    """Where the time goes, one stage at a time over the VM's disks (serially, so each stage
    has the machine to itself): the cold device read alone, the snapshot digest (cold), the
    export into a flat file, its read-back digest, and its fsync."""
    names = [n for n, _ in disks]
    out = {"cold_read": 0.0, "digest_cold": 0.0, "export": 0.0, "verify": 0.0, "fsync": 0.0}
    drop_cache(storage, names)
    t = time.perf_counter()
    for name in names:
        for path in storage.chunk_files(name):
            with open(path, "rb", buffering=0) as f:
                while f.read(4 * MiB):
                    pass
    out["cold_read"] = time.perf_counter() - t
    drop_cache(storage, names)
    for name, sid in disks:
        path = os.path.join(workdir, f"stage-{name}.img")
        t = time.perf_counter()
        expected = storage.disk_digest(name, snapshot=sid)
        out["digest_cold"] += time.perf_counter() - t
        t = time.perf_counter()
        storage.export_disk_at(name, snapshot=sid, path=path, durable=False)
        out["export"] += time.perf_counter() - t
        t = time.perf_counter()
        assert digest_flat_file(path) == expected
        out["verify"] += time.perf_counter() - t
        t = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        out["fsync"] += time.perf_counter() - t
        os.unlink(path)
    return {k: round(v, 3) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disk-mib", type=int, default=1024, help="disk size of the single VM (two disks)")
    parser.add_argument("--vms", type=int, default=20, help="VMs recovered at once in the second run")
    parser.add_argument("--many-disk-mib", type=int, default=256, help="disk size of each of those VMs (two disks)")
    parser.add_argument("--workers", type=int, default=4, help="VMs recovered in parallel in the second run")
    parser.add_argument("--only", choices=("one", "many"), help="run only one of the two runs")
    parser.add_argument("--workdir", default=None, help="where replicas and the site go (default: a temp dir)")
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"),
                        help="page whose RTO section is replaced with the results ('' to leave it)")
    args = parser.parse_args(argv)
    report: dict = {
        "benchmark": "rto",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    workdir = tempfile.mkdtemp(prefix="lifeboat-rto-", dir=args.workdir)
    try:
        if args.only in (None, "one"):
            one = run(workdir, vms=1, disk_bytes=args.disk_mib * MiB, workers=1, label="one")
            report["one_vm"] = {**one, "target_s": TARGET_ONE_S, "meets_target": one["rto_s"] <= TARGET_ONE_S}
            shutil.rmtree(workdir)
            os.makedirs(workdir)
        if args.only in (None, "many"):
            many = run(workdir, vms=args.vms, disk_bytes=args.many_disk_mib * MiB, workers=args.workers,
                       label="many")
            report["many_vms"] = {**many, "target_s": TARGET_MANY_S, "meets_target": many["rto_s"] <= TARGET_MANY_S}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if args.doc:
        write_doc(args.doc, report)
    return 0


SECTION = "## Recovery time (RTO)"


def write_doc(path: str, report: dict) -> None:
    """Replace (or add) the RTO section at the end of the benchmarks page."""
    import datetime

    lines = [
        SECTION,
        "",
        f"Written by `python bench/bench_rto.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({report['machine']['cpus']} CPUs, {report['machine']['platform']}; load average at the end "
        f"{os.getloadavg()[0]:.2f}). From the start of the recovery of a point to \"running and verified\" on the "
        "simulated recovery site with local storage: each disk's digest as of the point, the export into the "
        "recovered VM's disk file, the read-back digest compared with it, registration and power-on. Cold: the "
        "replica is read from the device. Baseline: a plain cold copy of the same bytes (read + write + fsync), "
        "measured in the same run.",
        "",
        "| run | data | RTO | target | baseline (plain copy) | RTO / baseline |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, name in (("one_vm", "1 VM"), ("many_vms", "VMs at once")):
        r = report.get(key)
        if not r:
            continue
        label = name if r["vms"] == 1 else f"{r['vms']} {name} ({r['workers']} in parallel)"
        lines.append(
            f"| {label} | {r['vms']} x 2 x {r['disk_mib']} MiB = {r['total_mib']} MiB | {r['rto_s']:.1f} s | "
            f"<= {r['target_s']:.0f} s ({'met' if r['meets_target'] else 'not met'}) | {r['baseline_plain_copy_s']:.1f} s | "
            f"{r['rto_over_baseline']:.2f} |"
        )
    stages = (report.get("one_vm") or {}).get("stages_s")
    if stages:
        lines += ["", "Where the time of the one-VM run goes, one stage at a time: "
                  + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in stages.items()) + "."]
    lines.append("")
    replace_section(path, SECTION, lines)


if __name__ == "__main__":
    raise SystemExit(main())
