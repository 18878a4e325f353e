"""What the test_fuzz_* modules share (there are no tests in this module).

- :data:`FUZZ`: the hypothesis settings of every fuzz property: 10,000 cases, derandomized,
  no example database, no deadline (a noisy CI machine must not fail a case for being slow).
- :class:`Host`: one event loop for a whole property, driven from the test's own thread. The
  system under test is entered once, in a task that stays open between examples; each example
  runs one coroutine to completion on that loop, under a hang guard (:data:`GUARD`).
  Hypothesis and the loop take turns in one thread: no thread hop per example.
- :class:`ErrorLog`: what was logged at ERROR while a case ran (a handler that crashed, an
  exception a server caught and logged): every case must log nothing.
- :func:`fuzz`: runs a property and counts its cases.
- :class:`Seed`: a case's details read off random bytes, so that a case takes a few
  hypothesis draws, not dozens (hypothesis costs ~50 µs a draw; 60,000 cases add up).
- :func:`json_from` / :func:`json_values`: JSON-like values read off a seed, with the
  interesting scalars (64-bit bounds, huge integers, NaN, infinities, control characters, lone
  surrogates where asked for); :func:`deep` (nested JSON text) and :func:`mutate`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CASES = 10_000
GUARD = 20.0  # seconds: a hang guard per case, never a timing assertion
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

T = TypeVar("T")
R = TypeVar("R")


class ErrorLog(logging.Handler):
    """Everything logged at ERROR or above, as one line each."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        self.records.append(f"{record.name}: {record.getMessage()}" + (f" ({exc!r})" if exc else ""))


@contextmanager
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


class Host(Generic[T]):
    """Runs ``system`` (an async context manager) on one event loop for a whole property.

    Between examples the loop does not run (hypothesis has the thread); each ``run`` lets the
    system and the case's coroutine run together until the case is done. A blocking portal
    (the loop in a second thread) works too, at ~0.1 ms and a GIL hand-over more per case.

    Example::

        with Host(serving()) as host:
            reply = host.run(host.system.send(case))
    """

    def __init__(self, system: AbstractAsyncContextManager[T]) -> None:
        self._cm = system
        self._runner = asyncio.Runner()
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.system: T

    def __enter__(self) -> Host[T]:
        self._runner.__enter__()
        try:
            self.system = self._runner.run(self._start())
        except BaseException:
            self._runner.__exit__(None, None, None)
            raise
        return self

    async def _start(self) -> T:
        self._stop = asyncio.Event()
        ready: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._serve(ready))
        await asyncio.wait([ready, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            await self._task  # it failed before it was ready: raise why
        return ready.result()

    async def _serve(self, ready: asyncio.Future[T]) -> None:
        assert self._stop is not None
        async with self._cm as system:
            ready.set_result(system)
            await self._stop.wait()

    def run(self, coro: Awaitable[R], guard: float = GUARD) -> R:
        """Run one coroutine to completion (at most ``guard`` seconds) while the system keeps running."""
        assert self._task is not None
        if self._task.done():
            getattr(coro, "close", lambda: None)()
            self._task.result()  # the system died: say why
            raise AssertionError("the system under test stopped")

        async def guarded() -> R:
            with anyio.fail_after(guard):
                return await coro

        return self._runner.run(guarded())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._task is not None and self._stop is not None:
                self._stop.set()
                self._runner.run(self._finish())
        finally:
            self._runner.__exit__(exc_type, exc, tb)

    async def _finish(self) -> None:
        assert self._task is not None
        with anyio.fail_after(GUARD):
            await self._task


def fuzz(strategy: st.SearchStrategy[T], case: Callable[[T], None], max_examples: int = CASES) -> int:
    """Run ``case`` on examples of ``strategy`` (:data:`FUZZ` settings); the number of cases run."""
    ran = 0

    @settings(FUZZ, max_examples=max_examples)
    @given(example=strategy)
    def property_(example: T) -> None:
        nonlocal ran
        ran += 1
        case(example)

    property_()
    return ran


# -- strategies -------------------------------------------------------------------------------

INTERESTING: list[Any] = [
    None, True, False, 0, 1, -1, 7, 2**31 - 1, -(2**31), 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64,
    -(10**30), 10**400, 0.0, -0.0, 0.5, -1.5, 5e-324, 1e308, float("inf"), float("-inf"), float("nan"),
    "", "a", "x", "y", "é", "💥", "\x00", "\n", "\u2028", '"', "\\", "-1", "1e5", "true", "null", "{}", "[]",
    "a" * 100,
]
SURROGATES = ["\ud800", "\udcff", "a\udfffb"]


class Seed:
    """Reads a case's details off random bytes: a property draws a few values from hypothesis
    (which kind of case, a size) and one seed, so 10,000 cases stay fast; shrinking the seed
    towards empty makes the details simplest (zeros, empty strings)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1] if self.pos <= len(self.data) else 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def pick(self, options: Sequence[T]) -> T:
        return options[self.byte() % len(options)]

    def text(self, max_size: int = 12) -> str:
        """Text of up to ``max_size`` characters: Latin-1 (control characters too), or UTF-8."""
        n = self.byte() % (max_size + 1)
        chunk = self.take(n)
        return chunk.decode("utf-8", "replace") if n % 2 else chunk.decode("latin-1")

    def rest(self) -> bytes:
        return self.take(len(self.data))


def json_from(seed: bytes | Seed, keys: Sequence[str] = (), *, surrogates: bool = False, obj: bool = False) -> Any:
    """A JSON-like value read off ``seed`` (an object if ``obj``): nested lists and objects (keys
    from ``keys`` or the seed), interesting scalars, text from the seed's bytes. Every seed makes a value."""
    scalars = INTERESTING + SURROGATES if surrogates else INTERESTING
    s = seed if isinstance(seed, Seed) else Seed(seed)

    def key() -> str:
        b = s.byte()
        return keys[b % len(keys)] if keys and b < 200 else s.text()

    def value(depth: int, b: int) -> Any:
        if b < 40 and depth < 5:
            return [value(depth + 1, s.byte()) for _ in range(s.byte() % 4)]
        if b < 80 and depth < 5:
            return {key(): value(depth + 1, s.byte()) for _ in range(s.byte() % 5)}
        if b < 100:
            return s.text()
        return scalars[b % len(scalars)]

    return value(0, 64 if obj else s.byte())


def json_values(keys: Sequence[str] = (), *, surrogates: bool = False, size: int = 32) -> st.SearchStrategy[Any]:
    """JSON-like values (one draw of a seed: cheap, so 10,000 cases stay fast)."""
    return st.binary(max_size=size).map(lambda seed: json_from(seed, keys, surrogates=surrogates))


def deep(depth: int, kind: str) -> bytes:
    """JSON text nested ``depth`` levels: arrays, objects, or arrays never closed."""
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth




def mutate(data: bytes, how: str, at: int, value: int) -> bytes:
    """``data`` truncated, with a bit flipped, a byte inserted or appended."""
    if not data:
        return bytes([value])
    i = at % len(data)
    if how == "truncate":
        return data[:i]
    if how == "flip":
        return data[:i] + bytes([data[i] ^ (1 << (value % 8))]) + data[i + 1 :]
    if how == "insert":
        return data[:i] + bytes([value]) + data[i:]
    return data + bytes([value])


mutations = st.tuples(st.sampled_from(["truncate", "flip", "insert", "append"]), st.integers(0, 1 << 16),
                      st.integers(0, 255))
