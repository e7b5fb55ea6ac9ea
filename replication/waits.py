"""The event keys replication's jobs wait on (``core.jobs.JobContext.wait``) and the places
that wake them (``core.jobs.job_wake``)."""


def item_wait_key(item_id) -> str:
    """An apply pass of the item ends (replication.engine.item_apply)."""
    return f"protected_item:{item_id}"


def machine_wait_key(machine_id) -> str:
    """The machine's agent registers, reports its status or an event (replication/api/agents.py)."""
    return f"machine:{machine_id}"


def initial_slot_wait_key(process_server_id) -> str:
    """An initial copy on this process server ends: a slot is free (replication.engine)."""
    return f"initial-slot:{process_server_id}"
