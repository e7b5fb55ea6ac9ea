"""A file system that refuses direct I/O, for tests of the fallbacks (tmpfs on older
kernels, ext4 with data=journal: opening with O_DIRECT fails with EINVAL)."""
from __future__ import annotations

import errno
import os


def refuse_direct_io(monkeypatch) -> None:
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
