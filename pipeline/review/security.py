"""Who may talk to the review app: loopback by default, a random token otherwise (as Jupyter does).

Rules
-----
- Bound to a loopback name (127.0.0.1, localhost, ::1) the app needs no token, but it answers only
  requests whose ``Host`` header is a loopback name: a web page elsewhere cannot reach it through a DNS
  name that it points at 127.0.0.1 (DNS rebinding).
- Bound to any other address (or with ``--token``) every request needs the token: in the URL
  (``?token=...``) the first time, after which a cookie (HttpOnly, SameSite=Strict) carries it. Without
  it the answer is 403.
- Requests that change something (POST) need a JSON body: a form on another site cannot send one
  without the browser asking the app first (CORS), and the app never says yes.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets

__all__ = ["LOOPBACK_HOSTS", "TOKEN_COOKIE", "is_loopback", "new_token", "token_matches"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
TOKEN_COOKIE = "review_token"


def is_loopback(host: str) -> bool:
    """True for the names this app serves without a token: 127.0.0.1, localhost and ::1 only.

    Other loopback addresses (127.0.0.2, ...) count as other addresses: the rule stays one line long.
    """
    return host.strip("[]").lower() in LOOPBACK_HOSTS


def host_header_name(header: str) -> str:
    """The host name of a ``Host`` header, without the port (``[::1]:8080`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name, _, port = header.rpartition(":")
    if name and port.isdigit():
        try:
            ipaddress.IPv6Address(header)  # a bare IPv6 address has colons of its own
        except ValueError:
            return name
    return header


def new_token() -> str:
    """A random URL-safe token (256 bits)."""
    return secrets.token_urlsafe(32)


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a token from a request with the app's."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())
