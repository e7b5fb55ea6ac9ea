"""The Celery app of the scale-out test's worker processes (``celery -A
tests.e2e.scaleout_worker worker``): Lifeboat's own app, with every apply pass recorded.

Recording only, in each worker process: when the data plane's apply pass of an item
(``ReplicaApplier.apply_pending``, the code that writes replica disks) starts and ends,
in which process, and the applied seq it began at and ended at, one JSON line each to
``LIFEBOAT_TEST_APPLY_LOG`` (O_APPEND: lines of several processes never interleave). The
test checks from it that two passes of one item never ran at the same time and that each
took the item up exactly where the previous one left it. The pass itself is unchanged.
"""
from __future__ import annotations

import json
import os
import time

from lifeboat.celery import app  # noqa: F401 - what `celery -A` finds here
from replication.dataplane.apply import ReplicaApplier

_LOG = os.environ["LIFEBOAT_TEST_APPLY_LOG"]
_apply_pending = ReplicaApplier.apply_pending


def _record(**fields) -> None:
    line = (json.dumps({"pid": os.getpid(), "t": time.monotonic(), **fields}) + "\n").encode()
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _recorded_apply_pending(self, **kwargs):
    pass_id = f"{os.getpid()}-{time.monotonic_ns()}"
    _record(event="start", item=self.item_id, pass_id=pass_id)
    try:
        result = _apply_pending(self, **kwargs)
    except BaseException as e:
        _record(event="end", item=self.item_id, pass_id=pass_id, error=repr(e))
        raise
    _record(event="end", item=self.item_id, pass_id=pass_id, applied_seq=result.applied_seq,
            batches=result.batches_applied)
    return result


ReplicaApplier.apply_pending = _recorded_apply_pending
