"""The simulated site's workload runner: the guest writes of every powered-on simulated VM.

    python -m vault.connectors.simsite --data-dir DIR

Each powered-on VM with a workload gets writes at its ``rate_bytes_per_s`` (a token bucket),
``write_size`` bytes each, 512-byte aligned and inside the disk, placed by its ``pattern``
(uniform, hotspot or sequential) and spread round-robin over its disks. The data is a mix of
zeros, repetitive text and random bytes, like real disk blocks. Every write goes through the
mobility write filter, so it is journaled. site.json is read again every second: power
changes, new workloads, resized, new and deleted VMs apply while it runs.

A disk file replaced while the runner had it open (a failback restores a VM's disks by
renaming a verified image over them while the VM is off) is noticed at that reload too: the
runner closes the old file and writes to the new one from then on.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from mobility.filter import WriteFilter
from vault.connectors.base import POWERED_ON, ConnectorError
from vault.connectors.simulated import SECTOR, SimulatedSite, disk_file, journal_path

log = logging.getLogger(__name__)

CHUNK = 4096
HOT_FRACTION = 16  # the hot region is 1/16 of the disk ...
HOT_SHARE = 0.9  # ... and takes 90% of the writes
BURST_SECONDS = 0.5  # a VM may catch up on at most this much unwritten time


@dataclass
class DiskStats:
    writes: int = 0
    bytes: int = 0


@dataclass
class _VmPlan:
    vm_uuid: str
    rate: int
    write_size: int
    pattern: str
    disks: list[tuple[int, int]]  # (key, capacity)


def payload(rng: random.Random, size: int) -> bytes:
    """``size`` bytes of disk-like data: zeroed, repetitive and random blocks mixed."""
    parts = []
    left = size
    while left > 0:
        n = min(CHUNK, left)
        kind = rng.random()
        if kind < 0.35:
            parts.append(bytes(n))
        elif kind < 0.7:
            line = b"lifeboat simulated guest record %010d status=ok\n" % rng.randrange(10**10)
            parts.append((line * (n // len(line) + 1))[:n])
        else:
            parts.append(rng.randbytes(n))
        left -= n
    return b"".join(parts)


class WorkloadRunner:
    """Writes what is due at each ``step()``; one runner per site at a time."""

    def __init__(
        self,
        site: SimulatedSite,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        reload_interval: float = 1.0,
        on_write: Callable[[str, int, int, bytes], None] | None = None,
    ) -> None:
        self.site = site
        self.on_write = on_write  # (vm_uuid, disk_key, offset, data) after each journaled write
        self.clock = clock
        self.reload_interval = reload_interval
        self.stats: dict[tuple[str, int], DiskStats] = {}
        self._rng = random.Random(seed)
        self._lock_fd = os.open(os.path.join(site.data_dir, "workload.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ConnectorError(f"Another workload runner is already writing to {site.where}") from None
        self._plan: list[_VmPlan] = []
        self._next_reload = float("-inf")
        self._filters: dict[tuple[str, int], WriteFilter] = {}
        self._opened: dict[tuple[str, int], tuple[int, int] | None] = {}  # (device, inode) each filter opened
        self._io_locks: dict[str, int] = {}
        self._budget: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._turn: dict[str, int] = {}
        self._next_offset: dict[tuple[str, int], int] = {}
        self._hot: dict[tuple[str, int, int], int] = {}

    # --- plan ----------------------------------------------------------------------------

    def reload(self) -> None:
        """Read site.json again."""
        state = self.site.read_state()
        plan = []
        for vm_uuid, vm in sorted(state["vms"].items()):
            workload = vm.get("workload") or {}
            if vm["power_state"] != POWERED_ON or not workload.get("rate_bytes_per_s"):
                continue
            plan.append(_VmPlan(vm_uuid, workload["rate_bytes_per_s"], workload["write_size"], workload["pattern"],
                                [(d["key"], d["capacity_bytes"]) for d in vm["disks"]]))
        active = {p.vm_uuid for p in plan}
        for vm_uuid in list(self._last):
            if vm_uuid not in active:  # stopped: no catching up when it starts again
                self._last.pop(vm_uuid, None)
                self._budget.pop(vm_uuid, None)
        disks = {(p.vm_uuid, key) for p in plan for key, _cap in p.disks}
        data_dir = self.site.data_dir
        for key in [k for k in self._filters
                    if k not in disks or _identity(disk_file(data_dir, *k)) != self._opened.get(k)]:
            self._opened.pop(key, None)
            self._filters.pop(key).close()
        for vm_uuid in [u for u in self._io_locks if u not in active]:
            os.close(self._io_locks.pop(vm_uuid))
        self._plan = plan

    # --- writing -------------------------------------------------------------------------

    def step(self) -> int:
        """Write what is due now; the number of bytes written."""
        now = self.clock()
        if now >= self._next_reload:
            self.reload()
            self._next_reload = now + self.reload_interval
        written = 0
        for vm in self._plan:
            budget = self._budget.get(vm.vm_uuid, 0.0) + vm.rate * (now - self._last.get(vm.vm_uuid, now))
            budget = min(budget, max(float(vm.write_size), vm.rate * BURST_SECONDS))
            self._last[vm.vm_uuid] = now
            due = int(budget // vm.write_size)
            if due and self._hold_io(vm.vm_uuid):
                try:
                    for _ in range(due):
                        written += self._write_one(vm)
                        budget -= vm.write_size
                finally:
                    fcntl.flock(self._io_locks[vm.vm_uuid], fcntl.LOCK_UN)
            self._budget[vm.vm_uuid] = budget
        return written

    def _hold_io(self, vm_uuid: str) -> bool:
        """Take the VM's I/O lock shared; False while a quiesced snapshot holds it."""
        fd = self._io_locks.get(vm_uuid)
        if fd is None:
            path = self.site.io_lock_file(vm_uuid)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = self._io_locks[vm_uuid] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _offset(self, vm: _VmPlan, key: int, capacity: int, size: int) -> int:
        slots = (capacity - size) // SECTOR  # the last sector a write of this size may start at
        if vm.pattern == "sequential":
            offset = self._next_offset.get((vm.vm_uuid, key), 0)
            if offset + size > capacity:
                offset = 0
            self._next_offset[(vm.vm_uuid, key)] = offset + size
            return offset
        if vm.pattern == "hotspot" and self._rng.random() < HOT_SHARE:
            hot_slots = max(1, capacity // HOT_FRACTION // SECTOR)
            start = self._hot.get((vm.vm_uuid, key, capacity))
            if start is None:
                start = self._hot[(vm.vm_uuid, key, capacity)] = self._rng.randint(0, max(0, slots - hot_slots))
            return min(slots, start + self._rng.randrange(hot_slots)) * SECTOR
        return self._rng.randint(0, slots) * SECTOR

    def _write_one(self, vm: _VmPlan) -> int:
        turn = self._turn.get(vm.vm_uuid, 0)
        self._turn[vm.vm_uuid] = turn + 1
        key, capacity = vm.disks[turn % len(vm.disks)]
        size = min(vm.write_size, capacity)
        offset = self._offset(vm, key, capacity, size)
        data = payload(self._rng, size)
        try:
            flt = self._filters.get((vm.vm_uuid, key))
            if flt is None:
                data_dir = self.site.data_dir
                path = disk_file(data_dir, vm.vm_uuid, key)
                # Taken before the file is opened: a file replaced in between is reopened at
                # the next reload, never missed.
                self._opened[(vm.vm_uuid, key)] = _identity(path)
                flt = self._filters[(vm.vm_uuid, key)] = WriteFilter(path, journal_path(data_dir, vm.vm_uuid, key))
            flt.write(offset, data)
        except OSError as exc:  # the VM was deleted under us; the next reload drops it
            log.warning("Write to disk %s of VM %s failed: %s", key, vm.vm_uuid, exc)
            stale = self._filters.pop((vm.vm_uuid, key), None)
            self._opened.pop((vm.vm_uuid, key), None)
            if stale is not None:
                try:
                    stale.close()
                except OSError:
                    pass
            return 0
        if self.on_write is not None:
            self.on_write(vm.vm_uuid, key, offset, data)
        stats = self.stats.setdefault((vm.vm_uuid, key), DiskStats())
        stats.writes += 1
        stats.bytes += size
        return size

    def close(self) -> None:
        for flt in self._filters.values():
            flt.close()
        self._filters.clear()
        self._opened.clear()
        for fd in self._io_locks.values():
            os.close(fd)
        self._io_locks.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file now at ``path``; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def run_workload(
    site: SimulatedSite,
    stop_event: threading.Event,
    *,
    tick: float = 0.05,
    seed: int | None = None,
    reload_interval: float = 1.0,
    report_every: float = 10.0,
    on_write: Callable[[str, int, int, bytes], None] | None = None,
) -> dict[tuple[str, int], DiskStats]:
    """Write to the site's powered-on VMs until ``stop_event`` is set; per-disk totals."""
    runner = WorkloadRunner(site, seed=seed, reload_interval=reload_interval, on_write=on_write)
    next_report = time.monotonic() + report_every
    try:
        while not stop_event.is_set():
            runner.step()
            if time.monotonic() >= next_report:
                next_report += report_every
                total = sum(s.bytes for s in runner.stats.values())
                log.info("Workload: %d bytes written to %d disks so far", total, len(runner.stats))
            stop_event.wait(tick)
    finally:
        runner.close()
    return runner.stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the simulated site's VM workloads.")
    parser.add_argument("--data-dir", required=True, help="the simulated site's directory (holds site.json)")
    parser.add_argument("--tick", type=float, default=0.05, help="seconds between write rounds")
    parser.add_argument("--seed", type=int, default=None, help="make offsets and data repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    site = SimulatedSite(args.data_dir, "", "")  # a local process beside the files: no login
    try:
        stats = run_workload(site, stop, tick=args.tick, seed=args.seed)
    except ConnectorError as exc:
        log.error("%s", exc)
        return 1
    log.info("Stopped after writing %d bytes", sum(s.bytes for s in stats.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
