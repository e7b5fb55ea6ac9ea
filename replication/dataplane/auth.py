"""Tokens shared by the configuration server and the process servers of a vault.

A token is an HMAC-SHA256 of its subject under the vault's auth key, so a process server
can check a token without asking anyone: the configuration server issues an item token
(subject ``item:<uuid>``) when it assigns the item to a process server, and the agent
presents it with every batch. ``issue_token`` is deterministic: issuing twice gives the
same token, and rotating the vault's auth key revokes every token at once.

Subjects in use:
    ``item:<uuid>``     an agent shipping batches of one protected item
    ``process-server``  the configuration server reading a process server's /v1/status
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

TOKEN_PREFIX = "lb1."
STATUS_SUBJECT = "process-server"
_DOMAIN = b"lifeboat-token/v1\x00"


def issue_token(key: bytes, subject: str) -> str:
    if not key:
        raise ValueError("the auth key is empty")
    mac = hmac.new(key, _DOMAIN + subject.encode("utf-8"), hashlib.sha256).digest()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def verify_token(key: bytes, token: str, subject: str) -> bool:
    """True only if ``token`` was issued under ``key`` for exactly ``subject``."""
    if not key or not isinstance(token, str):
        return False
    try:
        presented = token.encode("ascii")
    except UnicodeEncodeError:
        return False
    expected = issue_token(key, subject).encode("ascii")
    return hmac.compare_digest(presented, expected)


def item_subject(item_id: uuid.UUID | str) -> str:
    """The token subject of a protected item, with the uuid in its canonical form."""
    return f"item:{uuid.UUID(str(item_id))}"
