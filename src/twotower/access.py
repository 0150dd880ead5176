"""Who may do what to the HTTP service: the reload token and the ``Host`` names answered.

Anyone who reaches the port may ask for recommendations. Swapping the model is the
operator's: over HTTP only with a secret the operator set, compared in constant time, and
only in a JSON request (a web page can send a ``text/plain`` POST to any address without
asking first, but not a JSON one). A service bound to loopback also refuses requests
whose ``Host`` is not a loopback name: a web page that points its own domain at
127.0.0.1 (DNS rebinding) sends its domain.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from fastapi import HTTPException, Request

__all__ = ["LOOPBACK_HOSTS", "MIN_TOKEN_CHARS", "RELOAD_TOKEN_ENV", "admin_guard",
           "answered_hosts", "reload_token"]

RELOAD_TOKEN_ENV = "TWOTOWER_RELOAD_TOKEN"
MIN_TOKEN_CHARS = 16
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def reload_token(token_file: str | Path | None = None) -> str | None:
    """The secret that ``POST /v1/admin/reload`` needs: the content of ``token_file``, else
    the ``TWOTOWER_RELOAD_TOKEN`` environment variable, else None (no reload over HTTP).

    Raises ``ValueError`` for one too short to be a secret.
    """
    if token_file is not None:
        token, where = Path(token_file).read_text().strip(), f"reload token file {token_file}"
    elif RELOAD_TOKEN_ENV in os.environ:
        token, where = os.environ[RELOAD_TOKEN_ENV].strip(), f"${RELOAD_TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{where} holds {len(token)} characters; use a random secret of at "
                         f"least {MIN_TOKEN_CHARS}, e.g. from `python -c 'import secrets; "
                         "print(secrets.token_urlsafe())'`")
    return token


def admin_guard(token: str) -> Callable[[Request], None]:
    """A FastAPI dependency letting through only requests that carry ``token`` as a bearer
    token (else 401) and declare a JSON body (else 415)."""
    expected = token.encode()

    def guard(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 expected):
            raise HTTPException(401, [{"loc": ["header", "authorization"],
                                       "msg": "send the reload token as 'Authorization: "
                                       "Bearer TOKEN'"}], {"WWW-Authenticate": "Bearer"})
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise HTTPException(415, [{"loc": ["header", "content-type"],
                                       "msg": "send the header 'content-type: "
                                       "application/json' (and a body of {} or none)"}])

    return guard


def answered_hosts(bind: str, allowed: Sequence[str] = ()) -> list[str] | None:
    """The ``Host`` names a service bound to ``bind`` answers (None: any).

    Bound to loopback: the loopback names and ``allowed``. Bound beyond it: ``allowed`` if
    given, else any, since the proxy in front is where names are checked.
    """
    try:
        loopback = ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = bind == "localhost"
    if loopback:
        return [*LOOPBACK_HOSTS, *allowed]
    return list(allowed) or None
