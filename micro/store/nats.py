"""The NATS store: records in JetStream Key-Value buckets, for many machines.

Mapping:

- one KV bucket per store database, named ``micro-store-<database>`` (bucket names
  allow ``[a-zA-Z0-9_-]``; other characters become ``_XX`` per UTF-8 byte);
- a record's KV key is ``<table>.<segment>.<segment>…``: the store key split at
  ``/``, each segment (and the table) one subject token in which ``[a-zA-Z0-9_-]``
  stay and every other character becomes ``=XX`` per UTF-8 byte (an empty
  segment is ``=``). The mapping is reversible, so ``list()`` gets keys back, and a
  prefix up to its last ``/`` becomes a subject filter the server applies
  (``agent/bot/history/`` -> ``<table>.agent.bot.history.>``);
- the value is a msgpack ``[value, metadata]``; the expiry rides in the
  ``Micro-Expiry`` header, so listing keys reads headers only.

TTL: per key. The expiry (the store's clock) is checked on every read, and the
message is published with a per-message TTL (``Nats-TTL``, nats-server 2.11+,
rounded up to whole seconds) so the server removes it too. Buckets this store
creates allow per-message TTLs; on a bucket made elsewhere without them, expired
records are only hidden. ``delete`` writes a purge marker that itself expires
after a minute, so deleted keys do not pile up as tombstones.

Versions are KV revisions: the stream sequence of the record's message. A
conditional write looks at the key's last message (one direct get: a delete marker or
an expired record counts as no record), then publishes with the
``Nats-Expected-Last-Subject-Sequence`` header, so the server refuses it if anything
was written in between; only a write that lost to a delete marker or an expiring
record looks again (a few times at most).

An unconditional write is one publish, whatever the bucket holds. Reading a window (``limit``)
under a prefix lists the subjects there with one stream-info request, then fetches
the values it needs with direct gets; reading or listing a whole prefix streams the
last message of each subject through an ordered consumer (headers only for keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import msgspec

from micro.errors import ConfigError, StoreError
from micro.nats_connection import NatsConnection, NatsSettings, connect, nats_errors, servers_of
from micro.resource import redact
from micro.store._base import Record, Store, window

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js import api
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the nats store needs nats-py: pip install 'micro[nats]'", name=exc.name) from exc

__all__ = ["NatsStore", "bucket_name", "decode_key", "encode_key"]

EXPIRY_HEADER = "Micro-Expiry"
_TOMBSTONE_TTL = 60.0
_KV_OP = "KV-Operation"
_WRONG_LAST = (10071, 10164)  # JetStream's "wrong last sequence" error codes
_LOOKS = 5
_MARKER = "Nats-Marker-Reason"
_TOKEN_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")
_BUCKET_UNSAFE = re.compile(r"[^a-z0-9-]")
_ESCAPED = re.compile(r"(?:=[0-9A-F]{2})+")


class _Body(msgspec.Struct, array_like=True):
    value: bytes
    metadata: dict[str, str]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Body)


def _hex(match: re.Match[str], mark: str) -> str:
    return "".join(f"{mark}{b:02X}" for b in match.group().encode())


def _token(text: str) -> str:
    return _TOKEN_UNSAFE.sub(lambda m: _hex(m, "="), text) if text else "="


def _untoken(token: str) -> str:
    if "=" not in token:
        return token
    if token == "=":
        return ""
    return _ESCAPED.sub(lambda m: bytes.fromhex(m.group().replace("=", "")).decode(), token)


def bucket_name(database: str) -> str:
    """The KV bucket holding ``database``."""
    return "micro-store-" + _BUCKET_UNSAFE.sub(lambda m: _hex(m, "_"), database)


def encode_key(table: str, key: str) -> str:
    """The KV key of ``key`` in ``table`` (see the module docstring)."""
    return ".".join([_token(table), *(_token(s) for s in key.split("/"))])


def decode_key(kv_key: str) -> tuple[str, str]:
    """``(table, key)`` back from a KV key made by ``encode_key``."""
    table, *segments = kv_key.split(".")
    return _untoken(table), "/".join(_untoken(s) for s in segments)


class _Bucket(msgspec.Struct):
    stream: str
    subjects: str  # "$KV.<bucket>." prefix of every subject in it
    msg_ttl: bool  # whether the stream takes per-message TTLs
    direct: bool  # whether it answers direct gets (buckets made elsewhere may not)


class NatsStore(Store):
    """Records in JetStream KV on the NATS server at ``url`` (``nats://host:4222``).

    Example:
        async with NatsStore("nats://127.0.0.1:4222") as store:
            await store.write(Record("session/42", b"..."), ttl=3600)
    """

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        database: str = "micro",
        table: str = "default",
        clock: Callable[[], float] = time.time,
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(url, database=database, table=table, clock=clock)
        if urllib.parse.urlsplit(url).scheme not in ("nats", "tls"):
            raise ConfigError(f"NATS store URL {redact(url)!r} must look like nats://host:4222")
        self.servers = servers_of(url)  # nats://a:4222,b:4222 names several servers of one cluster
        self.settings = NatsSettings(connect_timeout=connect_timeout)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._conn: NatsConnection | None = None
        self._nc: Any = None
        self._js: Any = None
        self._buckets: dict[str, _Bucket] = {}
        self._gen = 0

    async def _open(self) -> None:
        conn = await connect(self.url, self.settings, who="store")
        try:
            await conn.require_jetstream("store")
        except BaseException:
            await conn.release()
            raise
        self._conn, self._nc, self._js = conn, conn.client, conn.jetstream(self.timeout)
        self._gen = conn.generation
        self._buckets = {}

    async def _close(self) -> None:
        conn, self._conn, self._nc, self._js = self._conn, None, None, None
        if conn is not None:
            await conn.release()

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        """Translate nats-py errors at the boundary (the one NATS mapping)."""
        return nats_errors(f"store {redact(self.url)} ({self.database}/{self.table}): {action}", StoreError)

    async def _bucket(self) -> _Bucket:
        root = self._root
        conn = root._conn
        if conn is not None and conn.generation != root._gen:  # a fresh client: contexts on the old one are dead
            root._nc, root._js, root._buckets = conn.client, conn.jetstream(self.timeout), {}
            root._gen = conn.generation
        bucket: _Bucket | None = root._buckets.get(self.database)
        if bucket is not None:
            return bucket
        name = bucket_name(self.database)
        js = root._js
        try:
            info = await js.stream_info(f"KV_{name}")
        except nats.js.errors.NotFoundError:
            config = api.KeyValueConfig(bucket=name, history=1, direct=True, storage=api.StorageType.FILE)
            await js.create_key_value(config)
            info = await js.stream_info(f"KV_{name}")
        config = info.config
        bucket = _Bucket(f"KV_{name}", f"$KV.{name}.", bool(config.allow_msg_ttl), bool(config.allow_direct))
        root._buckets[self.database] = bucket
        return bucket

    def _subject(self, bucket: _Bucket, key: str) -> str:
        return bucket.subjects + encode_key(self.table, key)

    async def _get(self, key: str, now: float) -> Record | None:
        with self._errors(f"read {key!r}"):
            bucket = await self._bucket()
            try:
                msg = await self._root._js.get_msg(
                    bucket.stream, subject=self._subject(bucket, key), direct=bucket.direct
                )
            except nats.js.errors.NotFoundError:
                return None
        headers = msg.headers or {}
        if _KV_OP in headers or _MARKER in headers:
            return None
        expiry = _expiry(headers)
        if expiry is not None and expiry <= now:
            return None
        return _record(key, msg.data, headers, msg.seq or 0)

    async def _last(self, bucket: _Bucket, subject: str, now: float) -> tuple[int, int]:
        """``(sequence of the subject's last message, live version)``, 0 for none."""
        try:
            msg = await self._root._js.get_msg(bucket.stream, subject=subject, direct=bucket.direct)
        except nats.js.errors.NotFoundError:
            return 0, 0
        headers = msg.headers or {}
        expiry = _expiry(headers)
        if _KV_OP in headers or _MARKER in headers or (expiry is not None and expiry <= now):
            return msg.seq or 0, 0
        return msg.seq or 0, msg.seq or 0

    async def _put(self, record: Record, if_version: int | None) -> int:
        with self._errors(f"write {record.key!r}"):
            bucket = await self._bucket()
            js = self._root._js
            subject = self._subject(bucket, record.key)
            headers: dict[str, str] = {}
            ttl = None
            if record.expiry is not None:
                headers[EXPIRY_HEADER] = repr(record.expiry)
                if bucket.msg_ttl:
                    ttl = max(1, math.ceil(record.expiry - self.clock()))
            payload = _ENCODER.encode(_Body(record.value, record.metadata))
            if if_version is None:
                ack = await js.publish(subject, payload, headers=headers or None, msg_ttl=ttl)
                return int(ack.seq)
            for _ in range(_LOOKS):
                last, live = await self._last(bucket, subject, self.clock())
                if live != if_version:
                    raise self._conflict(record.key, if_version, live)
                headers[api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value] = str(last)
                try:
                    ack = await js.publish(subject, payload, headers=headers, msg_ttl=ttl)
                    return int(ack.seq)
                except nats.js.errors.APIError as exc:
                    if exc.err_code not in _WRONG_LAST:
                        raise
                # written in between: look again (a live record there now is a conflict)
            raise self._conflict(record.key, if_version, None)

    async def _delete(self, key: str) -> None:
        with self._errors(f"delete {key!r}"):
            bucket = await self._bucket()
            headers = {_KV_OP: "PURGE", api.Header.ROLLUP.value: "sub"}
            ttl = _TOMBSTONE_TTL if bucket.msg_ttl else None
            await self._root._js.publish(self._subject(bucket, key), b"", headers=headers, msg_ttl=ttl)

    def _filter(self, bucket: _Bucket, prefix: str) -> str:
        """The subject filter for ``prefix``: its whole ``/`` segments as tokens, then ``>``."""
        *whole, _ = prefix.split("/")
        return bucket.subjects + ".".join([_token(self.table), *(_token(s) for s in whole), ">"])

    async def _scan(self, prefix: str, now: float, values: bool) -> list[tuple[str, Any]]:
        """Live ``(key, message)`` pairs under ``prefix``, sorted by key. The messages carry
        only headers unless ``values``."""
        bucket = await self._bucket()
        sub = await self._root._js.subscribe(
            self._filter(bucket, prefix),
            stream=bucket.stream,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            headers_only=not values,
            inactive_threshold=30.0,
        )
        found: dict[str, Any] = {}
        try:
            info = await sub.consumer_info()
            if info.num_pending or info.delivered.consumer_seq or sub.pending_msgs:
                while True:
                    msg = await sub.next_msg(timeout=self.timeout)
                    found[msg.subject] = msg  # an ordered consumer may redeliver after a reset
                    if msg.metadata.num_pending == 0:
                        break
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        live = []
        for subject, msg in found.items():
            headers = msg.headers or {}
            expiry = _expiry(headers)
            if _KV_OP in headers or _MARKER in headers or (expiry is not None and expiry <= now):
                continue
            key = decode_key(subject[len(bucket.subjects) :])[1]
            if key.startswith(prefix):
                live.append((key, msg))
        live.sort(key=lambda pair: pair[0])
        return live

    async def _subjects(self, bucket: _Bucket, prefix: str) -> list[tuple[str, str]]:
        """``(key, subject)`` of every subject under ``prefix`` that holds a message (live,
        expired or a delete marker), sorted by key: one stream-info request per 100,000."""
        found: list[tuple[str, str]] = []
        offset = 0
        while True:
            request = {"subjects_filter": self._filter(bucket, prefix), "offset": offset}
            reply = await self._root._nc.request(
                f"$JS.API.STREAM.INFO.{bucket.stream}", msgspec.json.encode(request), timeout=self.timeout
            )
            info = msgspec.json.decode(reply.data)
            if "error" in info:
                raise nats.js.errors.APIError.from_error(info["error"])
            subjects = info.get("state", {}).get("subjects") or {}
            for subject in subjects:
                key = decode_key(subject[len(bucket.subjects) :])[1]
                if key.startswith(prefix):
                    found.append((key, subject))
            offset += len(subjects)
            if not subjects or offset >= info.get("total", 0):
                break
        found.sort()
        return found

    async def _window(self, prefix: str, now: float, limit: int, offset: int, reverse: bool) -> list[Record]:
        """A window of live records: list the subjects, then get values in order (several
        at once) until the window is full, skipping delete markers and expired records."""
        bucket = await self._bucket()
        candidates = [key for key, _ in await self._subjects(bucket, prefix)]
        if reverse:
            candidates.reverse()
        records: list[Record] = []
        skip = offset
        while candidates and len(records) < limit:
            batch, candidates = candidates[: skip + limit - len(records)], candidates[skip + limit - len(records) :]
            for record in await asyncio.gather(*(self._get(key, now) for key in batch)):
                if record is None:
                    continue
                if skip:
                    skip -= 1
                elif len(records) < limit:
                    records.append(record)
        return records

    async def _list(self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool) -> list[str]:
        with self._errors(f"list {prefix!r}"):
            if limit is not None:
                return [r.key for r in await self._window(prefix, now, limit, offset, reverse)]
            live = await self._scan(prefix, now, values=False)
        return [key for key, _ in window(live, limit, offset, reverse)]

    async def _read_prefix(
        self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool
    ) -> list[Record]:
        with self._errors(f"read prefix {prefix!r}"):
            if limit is not None:
                return await self._window(prefix, now, limit, offset, reverse)
            live = window(await self._scan(prefix, now, values=True), None, offset, reverse)
        return [_record(key, msg.data, msg.headers or {}, msg.metadata.sequence.stream) for key, msg in live]


def _expiry(headers: dict[str, str]) -> float | None:
    raw = headers.get(EXPIRY_HEADER)
    return None if raw is None else float(raw)


def _record(key: str, data: bytes | None, headers: dict[str, str], version: int) -> Record:
    try:
        body = _DECODER.decode(data or b"")
    except msgspec.DecodeError:
        raise StoreError(f"the NATS KV entry for {key!r} was not written by a micro store") from None
    return Record(key, body.value, body.metadata, _expiry(headers), version)


