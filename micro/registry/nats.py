"""Registry on NATS JetStream Key-Value: services on many machines find each other.

One KV bucket (``micro_registry`` by default; ``nats://host:4222?bucket=name`` to
choose) holds one key per node, its value the node's record and the wall-clock
times it was written and expires. Heartbeats rewrite it; readers skip and delete expired entries
(so clocks of the machines should agree to within a TTL). A full read is one
ordered-consumer pass over the bucket, not a request per key; ``watch()`` diffs
such snapshots every ``poll_interval`` seconds, and keeps going across a NATS
restart (the shared connection of :mod:`micro.nats_connection` reconnects for ever;
a failed poll is retried on the next tick).
"""

from __future__ import annotations

import base64
import contextlib
import time
import urllib.parse
from typing import Any

import msgspec

from micro.errors import ConfigError, RegistryError, Unavailable
from micro.nats_connection import NatsConnection, NatsSettings, connect, nats_errors
from micro.registry._base import PollWatcher, Registry, ServiceRecord, Snapshot, Watcher
from micro.resource import redact

try:
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("the nats registry needs nats-py: pip install 'micro[nats]'", name=exc.name) from None


class _Entry(msgspec.Struct):
    record: ServiceRecord
    expires: float
    written: float = 0.0


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Entry).decode


def _token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=") or "_"


class NatsRegistry(Registry):
    """Registry in a JetStream KV bucket. ``nats://host:4222[?bucket=micro_registry]``."""

    def __init__(self, url: str = "nats://127.0.0.1:4222", *, bucket: str | None = None,
                 poll_interval: float = 1.0, connect_timeout: float = 2.0, timeout: float = 5.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "nats":
            raise ConfigError(f"nats registry URL {redact(url)!r} must start with nats://")
        query = urllib.parse.parse_qs(parts.query)
        self.url = url
        self.bucket = bucket or query.get("bucket", ["micro_registry"])[0]
        self.poll_interval = poll_interval
        self.settings = NatsSettings(connect_timeout=connect_timeout)
        self.timeout = timeout
        self._conn: NatsConnection | None = None
        self._js: Any = None
        self._kv: Any = None
        self._gen = 0

    async def _open(self) -> None:
        conn = await connect(self.url, self.settings, who="registry")
        try:
            with nats_errors(f"registry {redact(self.url)}: opening bucket {self.bucket!r}", RegistryError):
                js = conn.jetstream(self.timeout)
                try:
                    kv = await js.key_value(self.bucket)
                except BucketNotFoundError:
                    kv = await js.create_key_value(bucket=self.bucket, history=1)
        except BaseException:
            await conn.release()
            raise
        self._conn, self._js, self._kv, self._gen = conn, js, kv, conn.generation

    async def _fresh(self) -> None:
        """Re-open the bucket on the connection's fresh client after the old one gave up."""
        conn = self._conn
        if conn is None or conn.generation == self._gen:
            return
        js = conn.jetstream(self.timeout)
        with self._errors(f"opening bucket {self.bucket!r}"):
            self._kv = await js.key_value(self.bucket)
        self._js, self._gen = js, conn.generation

    async def _close(self) -> None:
        conn, self._conn, self._js, self._kv = self._conn, None, None, None
        if conn is not None:
            await conn.release()

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return nats_errors(f"registry {redact(self.url)}: {action}", Unavailable)

    @staticmethod
    def _key(record: ServiceRecord, node_id: str) -> str:
        return f"{_token(record.name)}.{_token(record.version)}.{_token(node_id)}"

    async def _register(self, record: ServiceRecord, ttl: float) -> None:
        await self._fresh()
        now = time.time()
        for node in record.nodes:
            one = msgspec.structs.replace(record, nodes=[node])
            with self._errors(f"register {record.name!r}"):
                await self._kv.put(self._key(record, node.id), _encode(_Entry(one, now + ttl, now)))

    async def _deregister(self, record: ServiceRecord) -> None:
        await self._fresh()
        for node in record.nodes:
            with self._errors(f"deregister {record.name!r}"):
                await self._kv.delete(self._key(record, node.id))

    async def _snapshot(self, name: str | None = None) -> dict[str, _Entry]:
        """Live entries by key: one stream-info request for the keys, then a direct get per key.

        (A KV watcher would be one pass, but nats-py's watcher can report "no more
        entries" before it has delivered them when the client is busy.)
        """
        if self._kv is None:
            raise Unavailable(f"registry {redact(self.url)} is closed")
        await self._fresh()
        pattern = f"{_token(name)}.>" if name is not None else ">"
        prefix = f"$KV.{self.bucket}."
        kv = self._kv
        with self._errors("list"):
            try:
                info = await self._js.stream_info(f"KV_{self.bucket}", subjects_filter=prefix + pattern)
            except NoKeysError:
                return {}
        keys = sorted(subject[len(prefix):] for subject in (info.state.subjects or {}))
        out: dict[str, _Entry] = {}
        now = time.time()
        for key in keys:
            with self._errors(f"read {key!r}"):
                try:
                    entry = await kv.get(key)
                except KeyNotFoundError:
                    continue  # deleted since the listing
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
                    await kv.delete(key)
        return out

    async def _records(self, name: str | None) -> list[ServiceRecord]:
        return [e.record for e in (await self._snapshot(name)).values()]

    def _missing_hint(self) -> str:
        return f" (bucket {self.bucket})"

    def _watch(self) -> Watcher:
        since, first = time.time(), True

        async def poll() -> Snapshot:
            nonlocal first
            entries = await self._snapshot()
            if first:  # the baseline leaves out what was written after watch(): it is reported as created
                first = False
                return {key: e.record for key, e in entries.items() if e.written < since}
            return {key: e.record for key, e in entries.items()}

        return PollWatcher(poll, self.poll_interval)
