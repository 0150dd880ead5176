"""Who may do what to the service: the reload token, and the Host names answered."""

from __future__ import annotations

import pytest

from twotower.access import RELOAD_TOKEN_ENV, answered_hosts, reload_token

TOKEN = "a-reload-secret-of-some-length"


def test_hosts_answered_depend_on_the_bind_address():
    assert answered_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert answered_hosts("::1", ["box.internal"]) == [
        "localhost", "127.0.0.1", "[::1]", "box.internal"]
    assert answered_hosts("localhost") == answered_hosts("127.0.0.2")
    assert answered_hosts("0.0.0.0") is None  # the proxy in front checks
    assert answered_hosts("0.0.0.0", ["api.example"]) == ["api.example"]


def test_reload_token_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(RELOAD_TOKEN_ENV, raising=False)
    assert reload_token() is None
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert reload_token(tmp_path / "token") == TOKEN
    monkeypatch.setenv(RELOAD_TOKEN_ENV, "short")
    with pytest.raises(ValueError, match=f"{RELOAD_TOKEN_ENV} holds 5 characters"):
        reload_token()
    monkeypatch.setenv(RELOAD_TOKEN_ENV, TOKEN)
    assert reload_token() == TOKEN
