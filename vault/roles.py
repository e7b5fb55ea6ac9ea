"""Roles per vault, modelled on ASR's built-in roles, and what each allows.

| role | view | disk images, keys, PS configuration | protect, resync, drills, failover, failback, plan runs | settings, policies, infrastructure, plans, deleting them | access |
| --- | --- | --- | --- | --- | --- |
| Owner | yes | yes | yes | yes | yes |
| Contributor | yes | yes | yes | yes | no |
| Operator | yes | yes | yes | no | no |
| Reader | yes | no | no | no | no |

A role is held by a user, or by a group the user is in (the highest counts). A superuser is
Owner of every vault (and the only one who creates vaults; its creator then holds Owner). A
user sees only the vaults they hold a role on. Registered with ``core.access`` when the app
starts, so every app asks the same question the same way.
"""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import IntegrityError, transaction
from django.db.models import Q

from core import access
from core.exceptions import Conflict, NotFound, ValidationFailed
from vault.models import RoleAssignment, Vault, VaultRole

R = VaultRole
ALLOWED: dict[str, frozenset[str]] = {
    R.OWNER: frozenset(access.ACTIONS),
    R.CONTRIBUTOR: frozenset({access.VIEW, access.VIEW_SENSITIVE, access.OPERATE, access.MANAGE}),
    R.OPERATOR: frozenset({access.VIEW, access.VIEW_SENSITIVE, access.OPERATE}),
    R.READER: frozenset({access.VIEW}),
}
RANK = {R.READER: 1, R.OPERATOR: 2, R.CONTRIBUTOR: 3, R.OWNER: 4}
# The table the portal shows beside the assignments: (role, what it allows).
ROLE_TABLE = [
    (R.OWNER.label, "Everything, including who has access."),
    (R.CONTRIBUTOR.label, "Everything but access: settings, policies, infrastructure, plans, and all an operator does."),
    (R.OPERATOR.label, "Protect, resynchronize, drills, failover, failback, plan runs; no deleting vaults, policies or "
                       "infrastructure."),
    (R.READER.label, "View only: never disk images, keys or process-server configuration."),
]
# The least role that allows each action, for refusals.
LEAST = {action: min((r for r in ALLOWED if action in ALLOWED[r]), key=RANK.get) for action in access.ACTIONS}


def user_roles(user) -> dict[int, str]:
    """{vault id: the user's highest role there}: one query (the user's own assignments and
    their groups'). Not kept between calls: a role given or taken counts at once."""
    roles: dict[int, str] = {}
    rows = RoleAssignment.objects.filter(Q(user=user) | Q(group__in=user.groups.all())).values_list("vault_id", "role")
    for vault_id, role in rows:
        if vault_id not in roles or RANK[role] > RANK[roles[vault_id]]:
            roles[vault_id] = role
    return roles


def role_of(user, vault_id: int) -> str | None:
    if not (user and user.is_authenticated):
        return None
    if user.is_superuser:
        return R.OWNER
    rows = RoleAssignment.objects.filter(Q(user=user) | Q(group__in=user.groups.all()), vault_id=int(vault_id))
    return max(rows.values_list("role", flat=True), key=RANK.get, default=None)


class VaultRoles:
    """The authorizer ``core.access`` asks."""

    def visible_vault_ids(self, user) -> set[int] | None:
        if user.is_superuser:
            return None
        return set(user_roles(user))

    def can(self, user, vault_id: int, action: str) -> bool:
        role = role_of(user, vault_id)
        return role is not None and action in ALLOWED[role]

    def refusal(self, user, vault_id: int, action: str) -> str:
        role = role_of(user, vault_id)
        name = Vault.objects.filter(pk=vault_id).values_list("name", flat=True).first() or f"vault {vault_id}"
        needed = R(LEAST[action]).label
        if role is None:
            return f"You hold no role on the vault {name}: ask one of its owners for access."
        return (f"Your role on the vault {name} is {R(role).label}, which does not let you {access.WORDS[action]}; "
                f"that takes {needed}{' or above' if LEAST[action] != R.OWNER else ''}.")


# --- assigning roles ------------------------------------------------------------------------


def role_assign(*, vault: Vault, role: str, user=None, group=None, by=None) -> RoleAssignment:
    """Give a user or a group a role on the vault (replacing the one they held)."""
    if role not in R.values:
        raise ValidationFailed(f"'{role}' is not a role; use one of {', '.join(R.values)}.",
                               extra={"fields": {"role": [", ".join(R.values)]}})
    if (user is None) == (group is None):
        raise ValidationFailed("A role is given to a user or to a group (one of them).",
                               extra={"fields": {"user": ["a user or a group"]}})
    with transaction.atomic():
        vault = Vault.objects.select_for_update().get(pk=vault.pk)
        owners = _owners(vault)
        try:
            assignment, _ = RoleAssignment.objects.update_or_create(
                vault=vault, user=user, group=group, defaults={"role": role})
        except IntegrityError:
            raise Conflict("That role assignment changed meanwhile; try again.") from None
        _keep_an_owner(vault, owners)
    return assignment


def role_remove(*, assignment: RoleAssignment) -> None:
    with transaction.atomic():
        vault = Vault.objects.select_for_update().get(pk=assignment.vault_id)
        owners = _owners(vault)
        assignment.delete()
        _keep_an_owner(vault, owners)


def _owners(vault: Vault) -> int:
    return RoleAssignment.objects.filter(vault=vault, role=R.OWNER).count()


def _keep_an_owner(vault: Vault, before: int) -> None:
    """A change never takes away a vault's last owner (superusers aside, who own every vault)."""
    if before and not _owners(vault):
        raise Conflict(f"The vault {vault.name} would have no owner left: give another user or group the Owner role "
                       "first.")


def find_user(name: str):
    User = get_user_model()
    user = User.objects.filter(**{User.USERNAME_FIELD: (name or "").strip()}).first()
    if user is None:
        raise NotFound(f"There is no user named {name!r}.")
    return user


def find_group(name: str) -> Group:
    group = Group.objects.filter(name=(name or "").strip()).first()
    if group is None:
        raise NotFound(f"There is no group named {name!r}.")
    return group
