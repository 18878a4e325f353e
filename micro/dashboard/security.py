"""The dashboard's login cookie and CSRF tokens.

- **Login** (only when the server has a token, ``--token-env``): the login form
  checks the token in constant time
  and stores it in the ``micro_token`` cookie, HttpOnly (no script reads it) and
  SameSite=Strict (no other site's page sends it); :class:`~micro.gateway.http.BearerAuth`
  accepts it like a bearer header.
- **CSRF**: every state-changing action is a POST that must carry the page's CSRF
  token (form field ``csrf`` or header ``X-CSRF-Token``) equal to the ``micro_csrf``
  cookie the page was served with (double submit: a page on another site can neither
  read the cookie nor the token). The gateway's Origin and Host checks
  (:class:`~micro.gateway.http.BrowserGuard`) apply to every request besides.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

TOKEN_COOKIE = "micro_token"
CSRF_COOKIE = "micro_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


class CsrfError(Exception):
    """A POST without the page's CSRF token."""


def csrf_token(request: Request) -> tuple[str, bool]:
    """The CSRF token of this browser (from its cookie), or a new one; and whether it is new."""
    have = request.cookies.get(CSRF_COOKIE, "")
    if len(have) >= 32:
        return have, False
    return secrets.token_urlsafe(32), True


def set_csrf(response: Response, token: str, base: str) -> None:
    response.set_cookie(CSRF_COOKIE, token, path=base or "/", httponly=True, samesite="strict")


def set_login(response: Response, token: str, base: str, *, https: bool) -> None:
    """Store the token in the HttpOnly, SameSite=Strict login cookie (Secure over HTTPS)."""
    response.set_cookie(TOKEN_COOKIE, quote(token, safe=""), path=base or "/", httponly=True, samesite="strict",
                        secure=https)


def clear_login(response: Response, base: str) -> None:
    response.delete_cookie(TOKEN_COOKIE, path=base or "/", httponly=True, samesite="strict")


async def posted(request: Request) -> dict[str, str]:
    """The POSTed form's text fields, once its CSRF token is checked against the cookie (:class:`CsrfError`
    if not)."""
    async with request.form(max_files=0) as form:
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    given = request.headers.get(CSRF_HEADER) or fields.get(CSRF_FIELD) or ""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not hmac.compare_digest(given.encode(), cookie.encode()):
        raise CsrfError("this form's CSRF token is missing or stale: reload the page and try again")
    return fields


def safe_next(target: str, base: str) -> str:
    """Where to go after logging in: a path on this server only (never another site)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return base + "/"
    return target


def when(ts: float | None) -> str:
    """A local date-time to the second; ``-`` for an unset time."""
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
