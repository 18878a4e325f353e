"""The dashboard: see and drive a registry's services, agents and flows in a browser.

Server-rendered pages (Jinja2, autoescaped) on the HTTP gateway's Starlette app, so
one server answers the JSON API (``/api/...``, ``/openapi.json``) and the pages at
``/``; live parts (the service list, an agent's streamed replies) are Server-Sent
Events, swapped in by htmx, which is vendored under ``static/`` with its SSE
extension (no CDN, no build step). Pages:

- ``/``: every service, agent and flow in the registry, with its nodes, live;
- ``/services/{name}``: endpoints, descriptions, schemas and a try-it form made from
  each request's JSON Schema;
- ``/agents/{name}``: a playground (streamed replies, ``→ tool(args)`` / ``← result``
  lines), the runs that wait for a person, and the run list with filters;
  ``/agents/{name}/runs/{id}``: the run's timeline (SVG), calls, reply, and
  approve / deny / answer forms;
- ``/flows/{name}``: runs with status filters and waiting runs;
  ``/flows/{name}/runs/{id}``: steps with timings and outputs, the waiting run's
  input form, replay of a failed run.

``micro run`` serves it (``dashboard: http://127.0.0.1:8080``), ``micro dashboard``
serves it against any registry, and :func:`app` mounts it in any ASGI app. Security
is the gateway's (loopback by default, token, Origin/Host checks) plus a login form
and CSRF tokens (:mod:`micro.dashboard.security`). See docs/dashboard.md.

Example::

    from starlette.applications import Starlette
    from starlette.routing import Mount
    import micro
    from micro.dashboard import app as dashboard

    # served as http://127.0.0.1:8000/micro/ (loopback names by default); a site reached by
    # another name passes it: dashboard(runtime, allowed_hosts=["micro.example.com"])
    site = Starlette(routes=[Mount("/micro", dashboard(micro.Runtime()))])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from micro.gateway.http import DEFAULT_MAX_BODY, LOOPBACK_HOSTS
from micro.gateway.http import app as gateway

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from micro.runtime import Runtime

__all__ = ["app"]


def app(runtime: Runtime, *, token: str | None = None, timeout: float = 60.0,
        allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS, allowed_origins: Iterable[str] = (),
        max_body: int = DEFAULT_MAX_BODY) -> Starlette:
    """The dashboard and the JSON API as one ASGI app on ``runtime`` (:func:`micro.gateway.http.app`
    with ``dashboard=True``).

    Args:
        runtime: whose registry the pages show and whose client makes the calls.
        token: when given, pages need a login with it and API calls a bearer header.
        timeout: seconds one call (or one streamed chat) may take.
        allowed_hosts: ``Host`` names served (others: 403, against DNS rebinding); by default this
            machine's loopback names, as ``micro api`` on loopback. The pages' own forms pass the
            Origin check only for these names: ``None`` serves any ``Host`` but refuses every form
            (a name re-pointed at the server would otherwise pass as its own).
        allowed_origins: other sites' origins whose pages may call the API.
        max_body: the largest request body or form accepted, in bytes (larger: 413, before it is parsed).
    """
    return gateway(runtime, token=token, timeout=timeout, allowed_hosts=allowed_hosts,
                   allowed_origins=allowed_origins, max_body=max_body, dashboard=True)
