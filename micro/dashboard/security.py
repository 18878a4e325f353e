"""The dashboard's login cookie and CSRF tokens.

- **Login** (only when the server has a token, ``--token-env``): the login form
  checks the token in constant time and stores a value derived from it
  (:func:`~micro.gateway.http.login_value`, an HMAC of the token: not the token, so a
  cookie that leaks to another server on the same host is no bearer token) in the
  ``micro_token_<port>`` cookie (:func:`~micro.gateway.http.login_cookie`: dashboards on two
  ports keep their own), HttpOnly (no script reads it) and SameSite=Strict (no other
  site's page sends it); :class:`~micro.gateway.http.BearerAuth` accepts that value only
  as this cookie.
- **Size**: a form over ``max_body`` bytes is refused (413) before it is parsed, by its
  ``Content-Length`` or, without one, as its bytes arrive.
- **CSRF**: every state-changing action is a POST that must carry the page's CSRF
  token (form field ``csrf`` or header ``X-CSRF-Token``) equal to the ``micro_csrf_<port>``
  cookie the page was served with (double submit: a page on another site can neither
  read the cookie nor the token; named by port as the login cookie, so two dashboards
  on one host neither overwrite nor accept each other's). The gateway's Origin and Host checks
  (:class:`~micro.gateway.http.BrowserGuard`) apply to every request besides.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from micro.gateway.http import login_cookie, login_value

CSRF_COOKIE = "micro_csrf"
"""The CSRF cookie's prefix: the cookie is ``micro_csrf_<port>`` (:func:`csrf_cookie`)."""
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


class Refused(Exception):
    """A POST refused before its form is used: :attr:`status` and :attr:`code` say how to answer."""

    status = 400
    code = "INVALID_ARGUMENT"


class CsrfError(Refused):
    """A POST without the page's CSRF token."""

    status = 403
    code = "PERMISSION_DENIED"


class FormTooLarge(Refused):
    """A POSTed form over the server's ``max_body`` bytes."""

    status = 413
    code = "RESOURCE_EXHAUSTED"


_STALE = "this form's CSRF token is missing or stale: reload the page and try again"


def csrf_cookie(request: Request) -> str:
    """The CSRF cookie's name for this request's port (``micro_csrf_8080``): cookies ignore ports."""
    return login_cookie(request.scope, CSRF_COOKIE)


def csrf_token(request: Request) -> tuple[str, bool]:
    """The CSRF token of this browser (from its cookie), or a new one; and whether it is new."""
    have = request.cookies.get(csrf_cookie(request), "")
    if len(have) >= 32:
        return have, False
    return secrets.token_urlsafe(32), True


def set_csrf(response: Response, request: Request, token: str, base: str) -> None:
    response.set_cookie(csrf_cookie(request), token, path=base or "/", httponly=True, samesite="strict")


def set_login(response: Response, request: Request, token: str, base: str, *, https: bool) -> None:
    """Log this browser in: the token's derived value in the port's HttpOnly, SameSite=Strict login cookie
    (Secure over HTTPS)."""
    response.set_cookie(login_cookie(request.scope), login_value(token.encode()).decode(), path=base or "/",
                        httponly=True, samesite="strict", secure=https)


def clear_login(response: Response, request: Request, base: str) -> None:
    response.delete_cookie(login_cookie(request.scope), path=base or "/", httponly=True, samesite="strict")


async def posted(request: Request, *, max_body: int) -> dict[str, str]:
    """The POSTed form's text fields, once its CSRF token is checked against the cookie (:class:`CsrfError`
    if not). A form over ``max_body`` bytes is refused (:class:`FormTooLarge`) before it is parsed."""
    cookie = request.cookies.get(csrf_cookie(request), "")
    if not cookie:  # nothing could match: no need to read the form
        raise CsrfError(_STALE)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise FormTooLarge(f"the form's {int(declared)} bytes are over this server's {max_body}-byte limit")
    seen = 0

    async def receive() -> Message:  # counts what arrives: a body without Content-Length is bounded too
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > max_body:
            raise FormTooLarge(f"the form is over this server's {max_body}-byte limit")
        return message

    async with Request(request.scope, receive).form(max_files=0) as form:
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    given = request.headers.get(CSRF_HEADER) or fields.get(CSRF_FIELD) or ""
    if not hmac.compare_digest(given.encode(), cookie.encode()):
        raise CsrfError(_STALE)
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
