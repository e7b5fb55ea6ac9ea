"""Celery queue names: one per workload, so a flood of one never starves another."""

CONTROL = "control"  # jobs an admin starts: enable, failover, commit, discovery, ...
DATA = "data"  # data-plane work near the process servers: initial copies, resync
APPLY = "apply"  # target side: apply replication logs, cut recovery points
MAINTENANCE = "maintenance"  # sweeps: RPO/health, retention, reaper, re-discovery

ALL = (CONTROL, DATA, APPLY, MAINTENANCE)
