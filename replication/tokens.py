"""The vault's tokens for agents, protected items and process servers (the HMACs of
``replication.dataplane.auth`` under the vault's auth key), each at its current generation.

An agent token is accepted by the configuration server only at the agent's current
generation (during a rotation the previous one still fetches the assignment, which hands
out the new token). An item token is checked by the process servers, offline: they accept
the item's current generation and any later one, and learn the current one from the answer
to their heartbeat (``item_token_generations``).
"""
from __future__ import annotations

from replication.dataplane.auth import (
    INVALID,
    REVOKED,
    VALID,
    check_token,
    issue_token,
    item_subject,
    token_generation,
    verify_token,
)
from replication.models import MobilityAgent, ProtectedItem
from vault.models import ProcessServer, Vault
from vault.services import vault_keys

__all__ = [
    "INVALID", "REVOKED", "VALID", "agent_token", "agent_token_check", "item_token", "item_token_generations",
    "process_server_token", "process_server_token_valid", "token_generation",
]


def _auth_key(vault: Vault) -> bytes:
    return vault_keys(vault=vault)[1]


def _agent_subject(agent: MobilityAgent) -> str:
    return f"agent:{agent.pk}"


def agent_token(*, agent: MobilityAgent) -> str:
    """The agent's token at its current generation."""
    return issue_token(_auth_key(agent.vault), _agent_subject(agent), agent.token_generation)


def agent_token_check(*, agent: MobilityAgent, token: str, previous: bool = False) -> str:
    """``VALID`` for the agent's current token (and, with ``previous``, the one a rotation
    under way replaces); ``REVOKED`` for a token the vault issued to this agent at an older
    generation; ``INVALID`` for anything else."""
    current = agent.token_generation
    result = check_token(_auth_key(agent.vault), token, _agent_subject(agent), min_generation=current)
    generation = token_generation(token)
    if result == VALID:
        return VALID if generation == current else INVALID  # a later generation was never issued
    if result == REVOKED and previous and agent.rotating and generation == current - 1:
        return VALID
    return result


def item_token(*, item: ProtectedItem) -> str:
    """The item's token at its current generation (what the agent shows the process server)."""
    return issue_token(_auth_key(item.vault), item_subject(item.pk), item.token_generation)


def item_token_generations(*, vault: Vault) -> dict[str, int]:
    """{item id: lowest valid token generation} of the vault's items whose tokens were ever
    rotated: what a process server enforces (items not listed accept generation 0 and up)."""
    rows = ProtectedItem.objects.filter(vault=vault, token_generation__gt=0).values_list("pk", "token_generation")
    return {str(pk): generation for pk, generation in rows}


def process_server_token(*, server: ProcessServer) -> str:
    return issue_token(_auth_key(server.vault), f"process-server:{server.pk}")


def process_server_token_valid(*, server: ProcessServer, token: str) -> bool:
    return verify_token(_auth_key(server.vault), token, f"process-server:{server.pk}", generation=0)
