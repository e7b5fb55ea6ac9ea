"""Who may do what in which vault: the actions, and the hook the vault app's roles fill in.

Lifeboat's roles are per vault (``vault.roles``: Owner, Contributor, Operator, Reader, as
ASR's built-in roles). Every app asks here, by vault id and one of five actions, so that core
imports no app; the vault app registers its authorizer when it starts. Without one (core
alone) a superuser may do everything and anyone else only view.
"""
from __future__ import annotations

from typing import Iterable, Protocol

from core.exceptions import PermissionDenied

VIEW = "view"  # see the vault and everything in it
VIEW_SENSITIVE = "view_sensitive"  # disk images, keys, process-server configuration
OPERATE = "operate"  # protect, resynchronize, drill, fail over, fail back, run plans, acknowledge alerts
MANAGE = "manage"  # vault settings, policies, infrastructure, plans, groups; deleting them
ACCESS = "access"  # who holds which role
ACTIONS = (VIEW, VIEW_SENSITIVE, OPERATE, MANAGE, ACCESS)

# What an action lets one do, for refusals ("Your role ... does not let you <words>").
WORDS = {
    VIEW: "see this vault",
    VIEW_SENSITIVE: "read disk images, keys or process-server configuration",
    OPERATE: "protect, resynchronize, test, fail over or fail back machines",
    MANAGE: "change the vault's settings, policies, infrastructure, recovery plans or groups",
    ACCESS: "change who has access to the vault",
}


class Authorizer(Protocol):
    def visible_vault_ids(self, user) -> set[int] | None:
        """The vaults the user holds a role on; None: every vault."""

    def can(self, user, vault_id: int, action: str) -> bool: ...

    def refusal(self, user, vault_id: int, action: str) -> str:
        """Why not, as a sentence naming the user's role and the role it takes."""


class _Default:
    def visible_vault_ids(self, user) -> set[int] | None:
        return None

    def can(self, user, vault_id: int, action: str) -> bool:
        return bool(user and user.is_authenticated and (action == VIEW or user.is_superuser))

    def refusal(self, user, vault_id: int, action: str) -> str:
        return f"Only an administrator may {WORDS[action]}."


_authorizer: Authorizer = _Default()


def register_authorizer(authorizer: Authorizer) -> Authorizer:
    global _authorizer
    _authorizer = authorizer
    return authorizer


def visible_vault_ids(user) -> set[int] | None:
    if not (user and user.is_authenticated):
        return set()
    return _authorizer.visible_vault_ids(user)


def can(user, vault_id, action: str) -> bool:
    if not (user and user.is_authenticated):
        return False
    if vault_id is None:  # a job of no vault (none today): administrators only
        return bool(user.is_superuser)
    return _authorizer.can(user, int(vault_id), action)


def require(user, vault_id, action: str) -> None:
    """``PermissionDenied`` (403) with a sentence unless the user may."""
    if not can(user, vault_id, action):
        if vault_id is None:
            raise PermissionDenied(f"You may not {WORDS[action]}.")
        raise PermissionDenied(_authorizer.refusal(user, int(vault_id), action))


def capabilities(user, vault_id) -> dict[str, bool]:
    """Every action, allowed or not, for the portal to show only what the user may do."""
    return {action: can(user, vault_id, action) for action in ACTIONS}


def scoped(queryset, user, path: str = "vault"):
    """The rows of the vaults the user holds a role on (``path``: the vault id's lookup)."""
    ids = visible_vault_ids(user)
    if ids is None:
        return queryset
    return queryset.filter(**{f"{path}__in": sorted(ids)})


def any_vault_allows(user, vault_ids: Iterable[int], action: str) -> bool:
    return any(can(user, v, action) for v in vault_ids)
