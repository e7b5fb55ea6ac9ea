"""What a recovered disk must hold, and how Lifeboat proves that it does.

Every recovery (test failover, failover, change of recovery point) builds each disk of the
recovered VM from a replica snapshot, reads it back *from where it was built* (the recovery
site's file, datastore or blob) and compares its digest with the replica's at the point. A
VM is reported running only after every disk matched; a mismatch raises
``VerificationFailed`` and the recovery-site connector removes what it built.

A digest is ``"blake3:<hex>"`` of the whole raw image, holes read as zeros
(``storage.base.ImageHasher``): equal for the same bytes however they are stored, so a flat
sparse file, a datastore download and a page blob compare with the replica directly. The
replica side reads only what the snapshot holds (chunks and page ranges never written are
hashed as zeros without being read) and hashes on all cores.

Plain Python, no Django: the recovery jobs, the recovery-site connectors, the tests and the
RTO benchmark use it alike.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

from .apply import PointNotFound, ReplicaApplier
from .storage import Storage
from .storage.base import DIGEST_ALGORITHM

__all__ = [
    "DiskDigest",
    "RecoveryDisk",
    "VerificationFailed",
    "check_digest",
    "point_disk_digests",
    "recovery_disks",
    "snapshot_digests",
]

# Disks hashed at once: each hash already uses every core (BLAKE3's threads), so a second
# disk mostly overlaps its reads with the first one's hashing.
DIGEST_WORKERS = 2


@dataclass(frozen=True, slots=True)
class DiskDigest:
    index: int
    size_bytes: int
    digest: str  # "blake3:<hex>" over the whole raw image (holes read as zeros)


class VerificationFailed(Exception):
    """A recovered disk read back from the recovery site does not hold the recovery point's
    bytes. The message names the VM, the disk and both digests."""

    def __init__(self, *, vm: str, disk_index: int, expected: str, actual: str, location: str = "") -> None:
        where = f" ({location})" if location else ""
        super().__init__(
            f"Disk {disk_index} of recovered VM {vm!r}{where} does not hold the recovery point's bytes: "
            f"read back {actual}, expected {expected}"
        )
        self.vm = vm
        self.disk_index = disk_index
        self.expected = expected
        self.actual = actual
        self.location = location


@dataclass(frozen=True, slots=True)
class RecoveryDisk:
    """What one recovered disk must hold: the replica snapshot to build it from and the
    digest it must read back with."""

    index: int
    size_bytes: int
    storage: Storage  # the target storage holding the replica
    disk_name: str  # replica disk name in that storage
    snapshot: str  # the point's snapshot id of that disk
    expected: DiskDigest  # from point_disk_digests

    def __post_init__(self) -> None:
        if self.expected.index != self.index or self.expected.size_bytes != self.size_bytes:
            raise ValueError(
                f"recovery disk {self.index} ({self.size_bytes} bytes) was given the digest of disk "
                f"{self.expected.index} ({self.expected.size_bytes} bytes)"
            )
        if not self.expected.digest.startswith(f"{DIGEST_ALGORITHM}:"):
            raise ValueError(f"recovery disk {self.index}: {self.expected.digest!r} is not a {DIGEST_ALGORITHM} digest")


def snapshot_digests(storage: Storage, disks: Mapping[int, tuple[str, str]]) -> dict[int, DiskDigest]:
    """Each disk's digest as of its snapshot: ``{index: (disk name, snapshot id)}``."""

    def one(index: int) -> DiskDigest:
        name, sid = disks[index]
        size = storage.disk_size(name, snapshot=sid)
        return DiskDigest(index=index, size_bytes=size, digest=storage.disk_digest(name, snapshot=sid))

    indexes = sorted(disks)
    if len(indexes) <= 1:
        return {i: one(i) for i in indexes}
    with ThreadPoolExecutor(max_workers=min(DIGEST_WORKERS, len(indexes)), thread_name_prefix="digest") as pool:
        return dict(zip(indexes, pool.map(one, indexes)))


def _point_disks(applier: ReplicaApplier, point_id: str) -> dict[int, tuple[str, str]]:
    point = applier.get_point(point_id)
    if not point.snapshots:
        raise PointNotFound(f"recovery point {point_id!r} has no disk snapshots")
    return {index: applier._point_disk(point_id, index) for index in sorted(point.snapshots)}


def point_disk_digests(applier: ReplicaApplier, point_id: str) -> dict[int, DiskDigest]:
    """Each replica disk's digest as of the recovery point (``PointNotFound`` if there is no
    such point)."""
    return snapshot_digests(applier.storage, _point_disks(applier, point_id))


def recovery_disks(
    applier: ReplicaApplier, point_id: str, digests: Mapping[int, DiskDigest] | None = None
) -> list[RecoveryDisk]:
    """The ``RecoveryDisk`` of every disk of the point, in index order (digests computed
    here unless given)."""
    disks = _point_disks(applier, point_id)
    if digests is None:
        digests = snapshot_digests(applier.storage, disks)
    missing = sorted(set(disks) - set(digests))
    if missing:
        raise ValueError(f"no digest given for disk(s) {missing} of recovery point {point_id!r}")
    return [
        RecoveryDisk(index=i, size_bytes=digests[i].size_bytes, storage=applier.storage, disk_name=disks[i][0],
                     snapshot=disks[i][1], expected=digests[i])
        for i in sorted(disks)
    ]


def check_digest(*, vm: str, disk: RecoveryDisk, actual: str, location: str = "") -> None:
    """Raise ``VerificationFailed`` unless ``actual`` (read back from the site) is the digest
    the disk must have."""
    if actual != disk.expected.digest:
        raise VerificationFailed(vm=vm, disk_index=disk.index, expected=disk.expected.digest, actual=actual,
                                 location=location)
