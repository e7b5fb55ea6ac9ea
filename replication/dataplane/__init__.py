"""The replication data plane: wire format, sealing, process server, storage, apply.

Plain Python with no Django imports, so the process server, the workers and the
benchmarks can use it on their own.
"""
