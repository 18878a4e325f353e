"""``micro.a2a.Client``: talk to any A2A agent (micro's gateway or any other server) through the official SDK.

The client resolves the agent's card from ``{url}/.well-known/agent-card.json``, then
speaks the interface the card names through ``a2a-sdk``'s client. What it adds is
micro's shape: text in, tasks out, and one error tree. The protocol's and the
transport's errors are translated at this boundary:

=====================================  ==========================================
A2A / transport                        micro
=====================================  ==========================================
task not found                         :class:`micro.errors.NotFound`
invalid params / request, content      :class:`micro.errors.BadRequest`
not cancelable, unsupported operation  :class:`micro.errors.Conflict`
401 / 403                              ``Unauthenticated`` / ``PermissionDenied``
a URL that serves no A2A card          :class:`micro.errors.BadRequest`
unreachable, timeouts, anything else   ``Unavailable`` / ``Timeout`` / ``Internal``
=====================================  ==========================================

Nothing of the caller's is sent but the message and, when given, ``token`` (as
``Authorization: Bearer``) and ``headers``, and only to the origin of ``url``: of the card's
interfaces, only those at that origin (scheme, host, port) are used, so a card cannot send
the credentials elsewhere (``BadRequest`` if it names none there). It depends on nothing of micro but its errors, so
agents (:mod:`micro.agent.delegation`) use it from below the gateways.

Example::

    async with micro.a2a.Client("http://127.0.0.1:4000/agents/task-mgr") as agent:
        task = await agent.send("What tasks are overdue for Alice?")
        print(micro.a2a.Client.text(task))
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx

from micro.errors import (
    BadRequest,
    Conflict,
    Error,
    Internal,
    NotFound,
    PermissionDenied,
    Timeout,
    Unauthenticated,
    Unavailable,
)

try:
    from a2a.client import A2ACardResolver, A2AClientError, AgentCardResolutionError, ClientConfig, ClientFactory
    from a2a.client import Client as SDKClient
    from a2a.client.errors import A2AClientTimeoutError
    from a2a.types import a2a_pb2 as pb
    from a2a.utils import errors as a2a_errors
    from google.protobuf import json_format
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the A2A client needs the a2a-sdk: pip install 'micro[a2a]'", name=exc.name) from exc

__all__ = ["Client", "card", "text_of"]

DEFAULT_TIMEOUT = 300.0


def text_of(item: pb.Task | pb.Message | pb.Artifact | pb.TaskStatus) -> str:
    """The text of a task (its artifacts, else its status message), a message, an artifact or a status."""
    if isinstance(item, pb.Task):
        if item.artifacts:
            return "\n".join(text_of(a) for a in item.artifacts)
        return text_of(item.status)
    if isinstance(item, pb.TaskStatus):
        return text_of(item.message) if item.HasField("message") else ""
    return "".join(p.text for p in item.parts if p.WhichOneof("content") == "text")


@contextlib.contextmanager
def _translated(url: str) -> Iterator[None]:
    """Raise micro's error for an SDK or transport error (the agent's URL and message kept)."""
    where = f"A2A agent {url}"
    try:
        yield
    except Error:
        raise
    except AgentCardResolutionError as exc:
        status = getattr(exc, "status_code", None)
        card_url = f"{url}/.well-known/agent-card.json"
        if isinstance(exc.__cause__, httpx.TimeoutException):
            raise Timeout(f"{where}: its card at {card_url} did not come in time") from None
        if isinstance(exc.__cause__, httpx.RequestError):
            raise Unavailable(f"{where} cannot be reached ({exc.__cause__ or type(exc.__cause__).__name__}); "
                              "is the URL right and the agent up?") from None
        if status == 401:
            raise Unauthenticated(f"{where}: its card needs a token (--token-env)") from None
        if status is not None:
            raise BadRequest(f"{where}: no A2A agent card at {card_url} (HTTP {status}); is the URL the agent's?"
                             ) from None
        raise BadRequest(f"{where}: {card_url} is not an A2A agent card: {exc}") from None
    except a2a_errors.TaskNotFoundError as exc:
        raise NotFound(f"{where}: {exc.message}") from None
    except (a2a_errors.InvalidParamsError, a2a_errors.InvalidRequestError, a2a_errors.ContentTypeNotSupportedError,
            a2a_errors.MethodNotFoundError, a2a_errors.JSONParseError) as exc:
        raise BadRequest(f"{where}: {exc.message}") from None
    except (a2a_errors.TaskNotCancelableError, a2a_errors.UnsupportedOperationError,
            a2a_errors.PushNotificationNotSupportedError) as exc:
        raise Conflict(f"{where}: {exc.message}") from None
    except a2a_errors.A2AError as exc:
        raise Internal(f"{where}: {type(exc).__name__}: {exc.message}") from None
    except A2AClientTimeoutError as exc:
        raise Timeout(f"{where} did not answer in time: {exc}") from None
    except A2AClientError as exc:
        text = str(exc)
        if "401" in text:
            raise Unauthenticated(f"{where} refused the request: it needs a valid bearer token ({text})") from None
        if "403" in text:
            raise PermissionDenied(f"{where} refused the request: {text}") from None
        raise Unavailable(f"{where}: {text}") from None
    except httpx.TimeoutException as exc:
        raise Timeout(f"{where} did not answer in time: {exc}") from None
    except httpx.HTTPError as exc:
        raise Unavailable(f"{where} cannot be reached: {exc}") from None


async def card(url: str, *, token: str | None = None, headers: Mapping[str, str] | None = None,
               timeout: float = 30.0) -> pb.AgentCard:
    """The Agent Card at ``url`` (``BadRequest`` if the URL serves none).

    Example::

        c = await micro.a2a.client.card("http://127.0.0.1:4000/agents/task-mgr")
        print(c.name, c.description)
    """
    url = _check_url(url)
    async with httpx.AsyncClient(headers=_headers(token, headers), timeout=timeout) as http:
        with _translated(url):
            return _checked_card(url, await A2ACardResolver(http, url).get_agent_card())


def _checked_card(url: str, found: pb.AgentCard) -> pb.AgentCard:
    """``found`` if it is a card an agent could have (a name and an interface), else ``BadRequest``."""
    if not found.name or not found.supported_interfaces:
        missing = "name" if not found.name else "interface (supportedInterfaces)"
        raise BadRequest(f"A2A agent {url}: {url}/.well-known/agent-card.json is not an A2A agent card: it has "
                         f"no {missing}")
    return found


def _origin(url: str) -> tuple[str, str, int]:
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme, 0)
    return parsed.scheme, parsed.host.lower(), port


def _same_origin(url: str, found: pb.AgentCard) -> pb.AgentCard:
    """``found`` with only the interfaces at ``url``'s origin (scheme, host, port): the client sends its
    token and headers to the interface it picks, and a card (whoever wrote it) must not send them to
    another host. ``BadRequest`` if the card names no interface there."""
    origin = _origin(url)
    kept = pb.AgentCard()
    kept.CopyFrom(found)
    del kept.supported_interfaces[:]
    foreign = []
    for interface in found.supported_interfaces:
        try:
            same = _origin(interface.url) == origin
        except (httpx.InvalidURL, TypeError):
            same = False
        if same:
            kept.supported_interfaces.append(interface)
        else:
            foreign.append(interface.url)
    if not kept.supported_interfaces:
        scheme, host, port = origin
        raise BadRequest(f"A2A agent {url}: its card names interfaces only at other origins ({', '.join(foreign)}); "
                         f"this client sends its requests (and their headers) only to {scheme}://{host}:{port}, "
                         "where the card came from. Use the URL of the agent's own host")
    return kept


def _check_url(url: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise BadRequest(f"{url!r} is not an A2A agent's URL: expected http(s)://host[:port]/path")
    return url.rstrip("/")


def _headers(token: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    if token:
        out["Authorization"] = f"Bearer {token}"
    return out


class Client:
    """An A2A client for the agent at ``url`` (its card at ``{url}/.well-known/agent-card.json``).

    Args:
        url: the agent's URL (``http://127.0.0.1:4000/agents/task-mgr`` for micro's gateway).
        token: a bearer token to send (``Authorization: Bearer``); nothing else of the caller is sent.
        headers: more HTTP headers to send with every request.
        timeout: seconds one request (or one whole stream) may take.

    Use it as an async context manager; :meth:`aclose` is idempotent.
    """

    def __init__(self, url: str, *, token: str | None = None, headers: Mapping[str, str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = _check_url(url)
        self._headers = _headers(token, headers)
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None
        self._card: pb.AgentCard | None = None
        self._unary: SDKClient | None = None
        self._streaming: SDKClient | None = None

    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Resolve the card and set up the SDK's clients (``BadRequest`` if the URL serves no card)."""
        if self._http is not None:
            return
        http = httpx.AsyncClient(headers=self._headers, timeout=self._timeout)
        try:
            with _translated(self.url):
                found = _checked_card(self.url, await A2ACardResolver(http, self.url).get_agent_card())
                usable = _same_origin(self.url, found)
                try:
                    self._unary = ClientFactory(ClientConfig(streaming=False, httpx_client=http)).create(usable)
                    self._streaming = ClientFactory(ClientConfig(streaming=True, httpx_client=http)).create(usable)
                except ValueError as exc:  # the SDK's "no compatible transports found"
                    bindings = ", ".join(i.protocol_binding for i in found.supported_interfaces)
                    raise BadRequest(f"A2A agent {self.url} offers {bindings}; this client speaks JSONRPC ({exc})"
                                     ) from None
        except BaseException:
            await http.aclose()
            raise
        self._http, self._card = http, found

    async def aclose(self) -> None:
        http, self._http = self._http, None
        self._unary = self._streaming = None
        if http is not None:
            await http.aclose()

    @property
    def card(self) -> pb.AgentCard:
        """The agent's card (resolved by :meth:`open`)."""
        if self._card is None:
            raise Unavailable(f"A2A agent {self.url}: the client is not open (use `async with Client(url)`)")
        return self._card

    def _sdk(self, streaming: bool) -> SDKClient:
        client = self._streaming if streaming else self._unary
        if client is None:
            raise Unavailable(f"A2A agent {self.url}: the client is not open (use `async with Client(url)`)")
        return client

    @staticmethod
    def message(text: str, *, context_id: str = "", task_id: str = "", data: Any = None) -> pb.SendMessageRequest:
        """The request that sends ``text`` (and ``data`` as a JSON data part) on a context or task."""
        parts = [pb.Part(text=text)] if text else []
        if data is not None:
            part = pb.Part(media_type="application/json")
            json_format.Parse(json.dumps(data), part.data)
            parts.append(part)
        return pb.SendMessageRequest(message=pb.Message(role=pb.ROLE_USER, message_id=uuid.uuid4().hex,
                                                        context_id=context_id, task_id=task_id, parts=parts))

    async def send(self, text: str, *, context_id: str = "", task_id: str = "",
                   data: Any = None) -> pb.Task | pb.Message:
        """Send a message and return the task once it ends or needs input (or the agent's message)."""
        request = self.message(text, context_id=context_id, task_id=task_id, data=data)
        with _translated(self.url):
            async for ev in self._sdk(False).send_message(request):
                return ev.task if ev.HasField("task") else ev.message
        raise Internal(f"A2A agent {self.url} answered the message with nothing")

    async def stream(self, text: str, *, context_id: str = "", task_id: str = "",
                     data: Any = None) -> AsyncIterator[pb.StreamResponse]:
        """Send a message and yield the agent's events as they come (the task, status and artifact updates).

        Agents whose card does not offer streaming answer with one event, the final task.
        """
        request = self.message(text, context_id=context_id, task_id=task_id, data=data)
        with _translated(self.url):
            async for ev in self._sdk(True).send_message(request):
                yield ev

    async def get(self, task_id: str, *, history_length: int | None = None) -> pb.Task:
        """The task ``task_id`` as the agent has it now."""
        request = pb.GetTaskRequest(id=task_id)
        if history_length is not None:
            request.history_length = history_length
        with _translated(self.url):
            return await self._sdk(False).get_task(request)

    async def cancel(self, task_id: str) -> pb.Task:
        """Cancel the task ``task_id`` (``Conflict`` if it cannot be)."""
        with _translated(self.url):
            return await self._sdk(False).cancel_task(pb.CancelTaskRequest(id=task_id))

    async def list(self, *, context_id: str = "", page_size: int = 50) -> list[pb.Task]:
        """The agent's tasks, newest first (one context's, when given)."""
        with _translated(self.url):
            page = await self._sdk(False).list_tasks(pb.ListTasksRequest(context_id=context_id, page_size=page_size))
        return list(page.tasks)

    async def subscribe(self, task_id: str) -> AsyncIterator[pb.StreamResponse]:
        """Follow a task that is still going (after a dropped stream): its snapshot, then its updates."""
        with _translated(self.url):
            async for ev in self._sdk(True).subscribe(pb.SubscribeToTaskRequest(id=task_id)):
                yield ev

    text = staticmethod(text_of)
