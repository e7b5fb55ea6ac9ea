# Failback (reprotect, fail over to on-premises, re-enable replication) works on the
# replication app's protected items and the vault's master target servers; it keeps no
# models of its own yet.
