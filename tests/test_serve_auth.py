"""The API token: read from the environment or a file, a rotated file taken up without a restart, and an open
(tokenless) API allowed only on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from recfound.serving.auth import (
    MIN_TOKEN_LENGTH,
    AuthConfigError,
    TokenSource,
    authorized,
    is_loopback,
    load_token,
    require_auth_off_network,
)


def test_token_from_env_or_file(tmp_path: Path) -> None:
    secret, env_token = tmp_path / "token", "e" * MIN_TOKEN_LENGTH
    secret.write_text("s3cret-0123456789\n")
    assert load_token({}) is None
    assert load_token({"RECFOUND_API_TOKEN_FILE": str(secret)}) == "s3cret-0123456789"
    assert load_token({"RECFOUND_API_TOKEN": env_token, "RECFOUND_API_TOKEN_FILE": str(secret)}) == env_token
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_token({"RECFOUND_API_TOKEN_FILE": str(tmp_path / "missing")})
    with pytest.raises(AuthConfigError, match="6 characters is guessable"):
        load_token({"RECFOUND_API_TOKEN": "s3cret"})
    secret.write_text("short")
    with pytest.raises(AuthConfigError, match="RECFOUND_API_TOKEN_FILE=.*guessable"):
        load_token({"RECFOUND_API_TOKEN_FILE": str(secret)})


def test_a_rotated_token_file_takes_effect_without_a_restart(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("first-token-0123456789")
    source = TokenSource({"RECFOUND_API_TOKEN_FILE": str(secret)})
    assert source.current() == "first-token-0123456789"
    secret.write_text("second-token-0123456789")  # another size: seen even where mtime has coarse resolution
    assert source.current() == "second-token-0123456789"
    secret.write_text("short")  # a broken rotation keeps the last good token instead of locking everyone out
    assert source.current() == "second-token-0123456789"
    secret.unlink()
    assert source.current() == "second-token-0123456789"


def test_open_api_only_on_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    require_auth_off_network(None, "127.0.0.1")
    require_auth_off_network("t", "0.0.0.0")
    with pytest.raises(AuthConfigError, match="not loopback"):
        require_auth_off_network(None, "0.0.0.0")
    assert authorized("Bearer t", "t") and authorized(None, None)
    assert not authorized("Bearer x", "t") and not authorized(None, "t") and not authorized("t", "t")
