"""The limits on the agents' anonymous endpoints (core/throttling.py).

Only registration takes a secret a person chose, the vault passphrase, so only it is
limited: wrong passphrases per client address. The agent and process-server tokens are
HMACs under the vault's key, which no number of tries guesses; limiting their failures per
address would only let one agent with a revoked token lock out the good agents that share
its address (a NAT, or one host running many agents).
"""
from __future__ import annotations

from core.throttling import FailedAttemptThrottle


class AgentRegistrationThrottle(FailedAttemptThrottle):
    scope = "agent_register"
    refusal = "Too many wrong registration passphrases from this address."
