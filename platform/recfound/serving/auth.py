"""Optional bearer-token auth: required whenever the API is reachable beyond this machine.

The token comes from ``RECFOUND_API_TOKEN`` or, for mounted secrets (Kubernetes, Vault agents), from the file
named by ``RECFOUND_API_TOKEN_FILE``. With neither set the API is open, which is only allowed when Serve's
HTTP proxy binds a loopback address: anything else refuses to start rather than serve unauthenticated. A token
shorter than ``MIN_TOKEN_LENGTH`` is refused (guessable). A token file is re-read when it changes, so a rotated
secret takes effect without a restart; a rotation to an unreadable, empty or short file keeps the previous token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "RECFOUND_API_TOKEN"
TOKEN_FILE_ENV = "RECFOUND_API_TOKEN_FILE"
BEARER = "bearer "
MIN_TOKEN_LENGTH = 16
"""Characters; e.g. ``openssl rand -hex 32`` gives 64."""

log = logging.getLogger("ray.serve")


class AuthConfigError(RuntimeError):
    """Auth is misconfigured (unreadable secret file, or an open API on a non-loopback address)."""


def _checked(token: str, where: str) -> str:
    if not token:
        raise AuthConfigError(f"{where}: the token is empty")
    if len(token) < MIN_TOKEN_LENGTH:
        raise AuthConfigError(
            f"{where}: a token of {len(token)} characters is guessable; use at least "
            f"{MIN_TOKEN_LENGTH} (e.g. `openssl rand -hex 32`)"
        )
    return token


def _read_file(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise AuthConfigError(f"{TOKEN_FILE_ENV}={path}: cannot read the token file: {err}") from err
    return _checked(token, f"{TOKEN_FILE_ENV}={path}")


def load_token(env: Mapping[str, str] = os.environ) -> str | None:
    """The configured token (the env var wins over the file), or None when auth is off."""
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return _checked(token, TOKEN_ENV)
    path = env.get(TOKEN_FILE_ENV, "").strip()
    return _read_file(path) if path else None


class TokenSource:
    """The token requests are checked against, following a rotated token file (its mtime and size are checked
    per request: a stat, no read, when nothing changed)."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.token = load_token(env)
        self._path = None if env.get(TOKEN_ENV, "").strip() else env.get(TOKEN_FILE_ENV, "").strip() or None
        self._seen = self._stamp()

    def _stamp(self) -> tuple[float, int] | None:
        try:
            stat = os.stat(self._path) if self._path else None
        except OSError:
            return None
        return (stat.st_mtime, stat.st_size) if stat else None

    def current(self) -> str | None:
        stamp = self._stamp()
        if self._path and stamp is not None and stamp != self._seen:
            self._seen = stamp
            try:
                self.token = _read_file(self._path)
            except AuthConfigError as err:
                log.error("token file changed but is not usable, keeping the previous token: %s", err)
        return self.token


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
