"""Optional bearer-token auth: required whenever the API is reachable beyond this machine.

The token comes from ``RECFOUND_API_TOKEN`` or, for mounted secrets (Kubernetes, Vault agents), from the file
named by ``RECFOUND_API_TOKEN_FILE``. With neither set the API is open, which is only allowed when Serve's
HTTP proxy binds a loopback address: anything else refuses to start rather than serve unauthenticated.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "RECFOUND_API_TOKEN"
TOKEN_FILE_ENV = "RECFOUND_API_TOKEN_FILE"
BEARER = "bearer "


class AuthConfigError(RuntimeError):
    """Auth is misconfigured (unreadable secret file, or an open API on a non-loopback address)."""


def load_token(env: Mapping[str, str] = os.environ) -> str | None:
    """The configured token (the env var wins over the file), or None when auth is off."""
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = env.get(TOKEN_FILE_ENV, "").strip()
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise AuthConfigError(f"{TOKEN_FILE_ENV}={path}: cannot read the token file: {err}") from err
    if not token:
        raise AuthConfigError(f"{TOKEN_FILE_ENV}={path}: the token file is empty")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_auth_off_network(token: str | None, host: str) -> None:
    """Refuse an open API on a non-loopback bind address (0.0.0.0 included)."""
    if token is None and not is_loopback(host):
        raise AuthConfigError(
            f"the HTTP proxy binds {host}, which is not loopback, and no API token is set: "
            f"set {TOKEN_ENV} or {TOKEN_FILE_ENV}, or bind 127.0.0.1"
        )


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries the token (constant-time compare); always True when off."""
    if token is None:
        return True
    if not header or not header.lower().startswith(BEARER):
        return False
    return hmac.compare_digest(header[len(BEARER) :].strip().encode(), token.encode())
