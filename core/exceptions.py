"""Domain errors. The API's exception handler turns each into a JSON error with a status."""
from __future__ import annotations


class LifeboatError(Exception):
    code = "error"
    status = 400

    def __init__(self, message: str, *, code: str | None = None, extra: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.extra = extra or {}


class ValidationFailed(LifeboatError):
    code = "invalid"
    status = 400


class NotFound(LifeboatError):
    code = "not_found"
    status = 404


class PermissionDenied(LifeboatError):
    code = "permission_denied"
    status = 403


class Conflict(LifeboatError):
    code = "conflict"
    status = 409


class InvalidTransition(Conflict):
    """The object is not in a state that allows the operation (someone else got there first)."""

    code = "invalid_state"

    def __init__(self, message: str, *, current_state: str, operation: str) -> None:
        super().__init__(message, extra={"current_state": current_state, "operation": operation})
        self.current_state = current_state
        self.operation = operation
