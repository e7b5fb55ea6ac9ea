"""The API's permission class: every request is checked against the user's role on the vault
of what it reads or changes (``core.access``).

A viewset says how it reaches an object's vault (``vault_path``: ``"vault"``,
``"item__vault"``, ``"pk"`` for a vault itself) and which action each of its operations
takes (``role_actions``: DRF action name -> ``core.access`` action; reads default to VIEW,
changes to ``unsafe_action``, MANAGE unless the viewset says otherwise). Lists show only
the vaults the user holds a role on; an object of another vault is a 404, as if it did not
exist; an action the role does not allow is a 403 with a sentence.
"""
from __future__ import annotations

from rest_framework.permissions import SAFE_METHODS, BasePermission

from core import access
from core.exceptions import PermissionDenied


def _vault_id(obj, path: str):
    if path == "pk":
        return obj.pk
    parts = path.split("__")
    for part in parts[:-1]:
        obj = getattr(obj, part)
        if obj is None:
            return None
    return getattr(obj, f"{parts[-1]}_id")


class VaultScoped:
    """Mixed into a viewset (before its base): scoping and the action each operation takes."""

    vault_path = "vault"
    role_actions: dict[str, str] = {}
    unsafe_action = access.MANAGE

    def get_queryset(self):
        return access.scoped(super().get_queryset(), self.request.user, self.vault_path)

    def access_action(self, request) -> str:
        named = self.role_actions.get(getattr(self, "action", None) or "")
        if named:
            return named
        return access.VIEW if request.method in SAFE_METHODS else self.unsafe_action

    def vault_id_of(self, obj):
        return _vault_id(obj, self.vault_path)

    def create_vault_id(self, request):
        """The vault a create names (its ``vault`` field); None if it names none (the
        serializer then says what is missing)."""
        value = request.data.get("vault") if hasattr(request.data, "get") else None
        if isinstance(value, bool):
            return None
        try:
            number = int(str(value))
        except (TypeError, ValueError):
            return None
        return number if 0 < number < 2**63 else None


class VaultRole(BasePermission):
    message = "Your role on this vault does not allow that."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        if getattr(view, "detail", False) or not isinstance(view, VaultScoped):
            return True  # an object's vault is checked with the object
        if view.action == "create" and getattr(view, "superuser_creates", "") and not user.is_superuser:
            raise PermissionDenied(view.superuser_creates)
        action = view.access_action(request)
        if action == access.VIEW:
            return True  # a list shows the user's vaults only
        vault_id = view.create_vault_id(request)
        if vault_id is not None:
            access.require(user, vault_id, action)
            return True
        visible = access.visible_vault_ids(user)
        if visible is not None and not any(access.can(user, v, action) for v in visible):
            access.require(user, min(visible) if visible else None, action)
        return True

    def has_object_permission(self, request, view, obj) -> bool:
        if not isinstance(view, VaultScoped):
            return True
        access.require(request.user, view.vault_id_of(obj), view.access_action(request))
        return True
