"""Secrets at rest (vCenter passwords, per-vault keys): Fernet, keyed from the settings."""
from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


def _fernet() -> Fernet:
    material = settings.LIFEBOAT_SECRETS_KEY or settings.SECRET_KEY
    key = hashlib.sha256(b"lifeboat-secrets:" + material.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt_secret(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return _fernet().encrypt(raw).decode()


def decrypt_secret(token: str) -> bytes:
    if not token:
        return b""
    try:
        return _fernet().decrypt(token.encode())
    except InvalidToken:
        raise ValueError("a stored secret cannot be decrypted: was LIFEBOAT_SECRETS_KEY or SECRET_KEY changed?") from None
