"""OpenAPI schema post-processing: what every operation can answer besides its success.

drf-spectacular documents each view's success response; the errors come from one place
(``core.api.exception_handler``) and have one shape, so they are documented here for every
operation instead of on each view. The agents' and process servers' bearer token is a
security scheme of its own (``agentToken``), named by the views that take it.
"""
from __future__ import annotations

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every API error: a stable code, a sentence for people, and per-error details.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Stable machine-readable code, e.g. invalid, not_found, invalid_state."},
                "message": {"type": "string", "description": "One sentence that says what is wrong and what to do."},
                "fields": {
                    "type": "object",
                    "additionalProperties": True,
                    "description": "For code invalid: the messages per field of the request.",
                },
                "current_state": {"type": "string", "description": "For code invalid_state: the object's state."},
                "operation": {"type": "string", "description": "For code invalid_state: the refused operation."},
            },
            "required": ["code", "message"],
            "additionalProperties": True,
        },
    },
    "required": ["error"],
}

ERRORS = {
    "400": "The request is invalid; the message names the field and the rule.",
    "401": "No credentials, or credentials that are not valid.",
    "403": "The credentials do not allow this operation.",
    "404": "No such object (or one the caller cannot see).",
    "409": "The object is not in a state that allows the operation, or others depend on it.",
    "413": "The request body is larger than the limit.",
    "415": "The request body is of a media type the operation does not read, or is not well formed as one "
           "(send application/json).",
    "429": "Too many requests; Retry-After says when to try again.",
}

AGENT_TOKEN = "agentToken"
AGENT_TOKEN_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": (
        "`Authorization: Bearer <token>`: the agent's token from /agents/register on the agent "
        "endpoints, the registration's poll_token on agents/registrations/{id}, the process server's "
        "token on its heartbeat."
    ),
}


# DRF writes a TimeField as a wall-clock "HH:MM:SS[.ffffff]" without an offset (the zone is
# another field, e.g. off_hours_time_zone); OpenAPI's format "time" demands an offset.
WALL_TIME = {
    "type": "string",
    "pattern": r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?$",
    "example": "22:00:00",
}


def _wall_times(node) -> None:
    """Replace every {"type": "string", "format": "time"} by the wall-clock pattern."""
    if isinstance(node, dict):
        if node.get("format") == "time" and node.get("type") == "string":
            del node["format"]
            for key, value in WALL_TIME.items():
                node.setdefault(key, value)
        for value in node.values():
            _wall_times(value)
    elif isinstance(node, list):
        for value in node:
            _wall_times(value)


def error_responses(result, generator, request, public):
    """drf-spectacular postprocessing hook: the Error component, the error responses of every
    operation, the agents' bearer security scheme, and times as the API writes them."""
    components = result.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    components.setdefault("securitySchemes", {})[AGENT_TOKEN] = AGENT_TOKEN_SCHEME
    _wall_times(result)
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, description in ERRORS.items():
                responses.setdefault(status, {"description": description, "content": error_content})
    return result
