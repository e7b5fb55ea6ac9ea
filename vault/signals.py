"""Signals the vault sends for other apps to act on (the vault imports none of them)."""
from __future__ import annotations

from django.dispatch import Signal

# Discovery saw machines' disks change. ``changes``: a list of dicts with ``machine_id``,
# ``key`` (the disk's key), ``old`` and ``new`` capacities in bytes (``old`` None: the disk
# was added; ``new`` None: it was removed). Replication keeps protected items' replica disks
# in step (``replication.disk_shape``).
machine_disks_changed = Signal()
