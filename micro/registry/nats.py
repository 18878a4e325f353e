"""Registry on NATS JetStream Key-Value: services on many machines find each other.

One KV bucket (``micro_registry`` by default; ``nats://host:4222?bucket=name`` to
choose) holds one key per node, its value the node's record and the wall-clock
time it expires. Heartbeats rewrite it; readers skip and delete expired entries
(so clocks of the machines should agree to within a TTL). A full read is one
ordered-consumer pass over the bucket, not a request per key; ``watch()`` diffs
such snapshots every ``poll_interval`` seconds, and keeps going across a NATS
restart (nats-py reconnects; a failed poll is retried on the next tick).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import time
import urllib.parse
from typing import Any

import anyio
import msgspec

from micro.errors import ConfigError, RegistryError, ServiceNotFound, Unavailable
from micro.registry._base import Event, Registry, ServiceRecord, Watcher, merge

try:
    from nats.aio.client import Client as NATS
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("the nats registry needs nats-py: pip install 'micro[nats]'", name=exc.name) from None

log = logging.getLogger("micro.registry.nats")


class _Entry(msgspec.Struct):
    record: ServiceRecord
    expires: float


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Entry).decode


def _token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=") or "_"


class NatsRegistry(Registry):
    """Registry in a JetStream KV bucket. ``nats://host:4222[?bucket=micro_registry]``."""

    def __init__(self, url: str = "nats://127.0.0.1:4222", *, bucket: str | None = None,
                 poll_interval: float = 1.0, connect_timeout: float = 2.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "nats":
            raise ConfigError(f"nats registry URL {url!r} must start with nats://")
        query = urllib.parse.parse_qs(parts.query)
        self.url = url
        self.bucket = bucket or query.get("bucket", ["micro_registry"])[0]
        self.poll_interval = poll_interval
        self._server = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self._connect_timeout = connect_timeout
        self._nc: Any = None
        self._js: Any = None
        self._kv: Any = None

    async def __aenter__(self) -> NatsRegistry:
        nc = NATS()
        failure: BaseException | None = None

        async def on_error(exc: BaseException) -> None:
            nonlocal failure
            failure = exc
            log.debug("registry %s: %s", self.url, exc)

        with anyio.move_on_after(self._connect_timeout):
            try:
                await nc.connect(
                    self._server, connect_timeout=max(1, round(self._connect_timeout)),
                    max_reconnect_attempts=-1, reconnect_time_wait=1, error_cb=on_error,
                )
            except Exception as exc:
                failure = exc
        if not nc.is_connected:
            with contextlib.suppress(Exception):
                await nc.close()
            reason = failure or f"no answer within {self._connect_timeout:g} s"
            raise Unavailable(f"cannot connect to registry {self.url}: {reason}")
        self._nc = nc
        js = self._js = self._nc.jetstream()
        try:
            self._kv = await js.key_value(self.bucket)
        except BucketNotFoundError:
            self._kv = await js.create_key_value(bucket=self.bucket, history=1)
        return self

    async def aclose(self) -> None:
        nc, self._nc, self._kv = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    @property
    def kv(self) -> Any:
        if self._kv is None:
            raise RegistryError(f"registry {self.url} is not open: use `async with`")
        return self._kv

    @staticmethod
    def _key(record: ServiceRecord, node_id: str) -> str:
        return f"{_token(record.name)}.{_token(record.version)}.{_token(node_id)}"

    async def register(self, record: ServiceRecord, *, ttl: float) -> None:
        expires = time.time() + ttl
        for node in record.nodes:
            one = msgspec.structs.replace(record, nodes=[node])
            await self._op(self.kv.put(self._key(record, node.id), _encode(_Entry(one, expires))))

    async def deregister(self, record: ServiceRecord) -> None:
        for node in record.nodes:
            await self._op(self.kv.delete(self._key(record, node.id)))

    async def _op(self, coro: Any) -> Any:
        try:
            return await coro
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise Unavailable(f"registry {self.url}: {exc or type(exc).__name__}") from None

    async def _snapshot(self, name: str | None = None) -> dict[str, _Entry]:
        """Live entries by key: one stream-info request for the keys, then a direct get per key.

        (A KV watcher would be one pass, but nats-py's watcher can report "no more
        entries" before it has delivered them when the client is busy.)
        """
        pattern = f"{_token(name)}.>" if name is not None else ">"
        prefix = f"$KV.{self.bucket}."
        info = await self._op(self._js.stream_info(f"KV_{self.bucket}", subjects_filter=prefix + pattern))
        keys = sorted(subject[len(prefix):] for subject in (info.state.subjects or {}))
        out: dict[str, _Entry] = {}
        now = time.time()
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                continue  # deleted since the listing
            except Exception as exc:
                raise Unavailable(f"registry {self.url}: reading {key!r} failed ({exc})") from None
            if entry.value is None:
                continue
            try:
                item = _decode(entry.value)
            except msgspec.DecodeError:
                continue
            if item.expires > now:
                out[key] = item
            else:
                with contextlib.suppress(Exception):
                    await self.kv.delete(key)
        return out

    async def get(self, name: str) -> list[ServiceRecord]:
        try:
            snap = await self._snapshot(name)
        except NoKeysError:
            snap = {}
        found = merge([e.record for e in snap.values() if e.record.name == name])
        if not found:
            raise ServiceNotFound(f"service {name!r} is not registered in {self.url} (bucket {self.bucket})")
        return found

    async def list(self) -> list[ServiceRecord]:
        return merge([e.record for e in (await self._snapshot()).values()])

    def watch(self) -> Watcher:
        return _NatsWatcher(self)


class _NatsWatcher(Watcher):
    def __init__(self, registry: NatsRegistry) -> None:
        self._registry = registry
        self._snapshot: dict[str, _Entry] | None = None
        self._pending: collections.deque[Event] = collections.deque()
        self._closed = asyncio.Event()

    async def __anext__(self) -> Event:
        while not self._pending:
            if self._snapshot is not None:
                with anyio.move_on_after(self._registry.poll_interval):
                    await self._closed.wait()
            if self._closed.is_set():
                raise StopAsyncIteration
            try:
                snap = await self._registry._snapshot()
            except Unavailable as exc:
                log.debug("registry watch: %s (retrying)", exc)
                if self._snapshot is None:
                    self._snapshot = {}
                continue
            if self._snapshot is not None:
                self._diff(self._snapshot, snap)
            self._snapshot = snap
        return self._pending.popleft()

    def _diff(self, old: dict[str, _Entry], new: dict[str, _Entry]) -> None:
        for key, entry in new.items():
            before = old.get(key)
            if before is None:
                self._pending.append(Event(type="create", service=entry.record))
            elif before.record != entry.record:
                self._pending.append(Event(type="update", service=entry.record))
        for key, entry in old.items():
            if key not in new:
                self._pending.append(Event(type="delete", service=entry.record))

    async def aclose(self) -> None:
        self._closed.set()
