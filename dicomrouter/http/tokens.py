"""Clients' HTTP tokens: made by the CLI (`clients token`), checked by http/auth.py; without aiohttp."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_BYTES = 32


def new_token() -> tuple[str, str]:
    """A random token and its sha256 (hex): the token is shown once, only the hash is kept."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, token_sha256(token)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
