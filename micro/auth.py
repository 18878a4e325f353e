"""Token authentication: a handler wrapper that checks bearer tokens, and a call wrapper that sends one.

Server side::

    auth = micro.auth.TokenAuth({
        "s3cr3t-ops": ["*"],                      # may call every endpoint
        "s3cr3t-reader": ["Task.List*"],          # fnmatch patterns over "Handler.Method"
    }, public=["Task.ListOverdue"])               # callable without a token
    micro.New("task", handler_wrappers=[auth])

Client side::

    micro.Runtime(call_wrappers=[micro.auth.bearer("s3cr3t-reader")])

A call without a token (or with an unknown one) fails with ``Unauthenticated``;
a known token outside its patterns with ``PermissionDenied``. Tokens travel as
``authorization: Bearer …`` metadata, are compared by their SHA-256 digest with
``hmac.compare_digest`` (no timing leak), and never appear in an error or log.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

from micro.errors import PermissionDenied, Unauthenticated, UsageError
from micro.middleware import Next, Request, Wrapper

HEADER = "authorization"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuth:
    """Checks ``authorization: Bearer <token>`` against known tokens and their endpoint patterns."""

    def __init__(self, tokens: Mapping[str, Iterable[str]], *, public: Iterable[str] = ()) -> None:
        for t in tokens:
            if not isinstance(t, str) or not t.strip():
                raise UsageError("TokenAuth: every token must be a non-empty string (an unset environment "
                                 "variable gives an empty one, and `Bearer ` with nothing after it would pass)")
            if t != t.strip():
                raise UsageError("TokenAuth: a token must not start or end with spaces (the header's are stripped)")
        self._grants = [(_digest(t), tuple(patterns)) for t, patterns in tokens.items()]
        self.public = tuple(public)

    def _patterns(self, token: str) -> tuple[str, ...] | None:
        digest = _digest(token)
        found: tuple[str, ...] | None = None
        for known, patterns in self._grants:  # compare with every grant: constant work per call
            if hmac.compare_digest(known, digest):
                found = patterns
        return found

    def check(self, endpoint: str, metadata: Mapping[str, str]) -> None:
        """Raise ``Unauthenticated`` / ``PermissionDenied`` unless the metadata may call ``endpoint``."""
        if any(fnmatch.fnmatchcase(endpoint, p) for p in self.public):
            return
        value = metadata.get(HEADER, "")
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(f"{endpoint} needs a bearer token (metadata authorization: Bearer …)")
        patterns = self._patterns(token)
        if patterns is None:
            raise Unauthenticated(f"{endpoint}: the bearer token is not valid")
        if not any(fnmatch.fnmatchcase(endpoint, p) for p in patterns):
            raise PermissionDenied(f"{endpoint}: this token may not call it")

    def __call__(self, next: Next) -> Next:
        async def authenticated(req: Request) -> Any:
            self.check(req.endpoint, req.metadata)
            return await next(req)

        return authenticated


def bearer(token: str) -> Wrapper:
    """A call wrapper that sends ``token`` with every call (unless the call sets its own)."""
    header = f"Bearer {token}"

    def wrap(next: Next) -> Next:
        async def with_token(req: Request) -> Any:
            if HEADER not in req.metadata:
                req.metadata = {**req.metadata, HEADER: header}
            return await next(req)

        return with_token

    return wrap
