"""The mobility agent's exceptions."""
from __future__ import annotations


class AgentError(Exception):
    """The agent cannot go on with an operation; the message says what to fix."""


class RegistrationPending(AgentError):
    """The configuration server keeps the registration for an administrator's approval (the
    machine has an agent already); the agent gets its credentials once it is approved."""

    def __init__(self, message: str, *, registration_id: str) -> None:
        super().__init__(message)
        self.registration_id = registration_id


class Waiting(Exception):
    """The pass cannot go on before something outside the agent happens (the replica's
    checksums being computed): the cycle ends and the next one tries again."""


class NeedsResync(Exception):
    """The item lost track of changes: it is reported and waits for a resync (``full``: the
    replica cannot be trusted either, every block is sent again)."""

    def __init__(self, reason: str, *, full: bool) -> None:
        super().__init__(reason)
        self.reason, self.full = reason, full
