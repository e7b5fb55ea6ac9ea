"""Tokens shared by the configuration server and the process servers of a vault.

A token is an HMAC-SHA256 of its subject under the vault's auth key, so a process server
can check a token without asking anyone: the configuration server issues an item token
(subject ``item:<uuid>``) when it assigns the item to a process server, and the agent
presents it with every batch. ``issue_token`` is deterministic: issuing twice gives the
same token, and rotating the vault's auth key revokes every token at once.

Generations revoke one subject's tokens without touching the others. A token of
generation 0 is ``lb1.<mac>`` over the subject itself (tokens issued before generations
existed are generation 0); a token of generation n >= 1 is ``lb1.<n>.<mac>`` over the
subject, a NUL and n (no subject holds a NUL, so no token of one subject is another's).
The token says which generation it claims and the MAC proves it, so a process server checks
it offline against the lowest generation it was told is still valid for the item
(``check_token``): bumping an item's generation on the configuration server revokes every
older token once the process servers hear of it.

Subjects in use:
    ``item:<uuid>``       an agent shipping batches of one protected item
    ``agent:<uuid>``      a mobility agent calling the configuration server
    ``process-server``    the configuration server reading a process server's /v1/status
    ``process-server:<id>``  a process server reporting to the configuration server
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

TOKEN_PREFIX = "lb1."
STATUS_SUBJECT = "process-server"
_DOMAIN = b"lifeboat-token/v1\x00"
MAX_GENERATION = 2**63 - 1

# What ``check_token`` says of a token.
VALID = "valid"
REVOKED = "revoked"  # issued by the vault for this subject, but of a generation revoked since
INVALID = "invalid"  # not issued for this subject under this key at all


def issue_token(key: bytes, subject: str, generation: int = 0) -> str:
    if not key:
        raise ValueError("the auth key is empty")
    if not 0 <= generation <= MAX_GENERATION:
        raise ValueError(f"a token generation is 0 to {MAX_GENERATION}, not {generation}")
    if "\x00" in subject:
        raise ValueError("a token subject holds no NUL character")
    message = subject if generation == 0 else f"{subject}\x00{generation}"
    mac = hmac.new(key, _DOMAIN + message.encode("utf-8"), hashlib.sha256).digest()
    encoded = base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
    return f"{TOKEN_PREFIX}{encoded}" if generation == 0 else f"{TOKEN_PREFIX}{generation}.{encoded}"


def token_generation(token: str) -> int | None:
    """The generation a token claims (not yet proven), or None if it is not shaped like a token."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        return None
    parts = token[len(TOKEN_PREFIX):].split(".")
    if len(parts) == 1:
        return 0
    digits = parts[0]
    if len(parts) != 2 or not (digits.isascii() and digits.isdigit()) or digits.startswith("0") or len(digits) > 19:
        return None
    generation = int(digits)
    return generation if generation <= MAX_GENERATION else None


def check_token(key: bytes, token: str, subject: str, *, min_generation: int = 0) -> str:
    """``VALID`` if ``token`` was issued under ``key`` for ``subject`` at a generation of at
    least ``min_generation``; ``REVOKED`` if it was issued for it at an older generation;
    ``INVALID`` otherwise."""
    generation = token_generation(token)
    if not key or generation is None:
        return INVALID
    try:
        presented = token.encode("ascii")
    except UnicodeEncodeError:
        return INVALID
    if not hmac.compare_digest(presented, issue_token(key, subject, generation).encode("ascii")):
        return INVALID
    return VALID if generation >= min_generation else REVOKED


def verify_token(key: bytes, token: str, subject: str, *, generation: int | None = None) -> bool:
    """True only if ``token`` was issued under ``key`` for exactly ``subject`` (and, when
    given, exactly that ``generation``)."""
    if generation is not None and token_generation(token) != generation:
        return False
    return check_token(key, token, subject) == VALID


def item_subject(item_id: uuid.UUID | str) -> str:
    """The token subject of a protected item, with the uuid in its canonical form."""
    return f"item:{uuid.UUID(str(item_id))}"
