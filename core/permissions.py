from rest_framework.permissions import SAFE_METHODS, BasePermission


class ReadOrAdmin(BasePermission):
    """Any signed-in user may read; changing anything takes a staff (admin) account."""

    message = "Only administrators can change the vault; your account can only view it."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        return request.method in SAFE_METHODS or user.is_staff
