"""Structured logging: every record made inside an agent run carries the run id.

micro logs through the standard :mod:`logging` module (loggers ``micro.*``) and
leaves configuration to the application, except under ``micro run``, which calls
:func:`configure` (``--log-level`` / ``MICRO_LOG_LEVEL``, ``--log-format`` /
``MICRO_LOG_FORMAT``).

:class:`RunIdFilter` adds ``micro_run_id`` to a record from the call context: an
agent run sets it, and tool calls carry it to the services they reach (the
``micro-run-id`` metadata), so a handler's own ``log.info(...)`` in another
process is tagged with the run that caused it. Attributes named ``micro_*``
(``extra={"micro_run_id": ...}``) become fields of a JSON line::

    {"ts": "2026-11-24T18:40:01.123Z", "level": "INFO", "logger": "micro.agent",
     "message": "agent task-mgr run 18eb…: 1 tool calls", "run_id": "18eb…", "agent": "task-mgr"}

Embedding micro in an application with its own logging set-up, add the filter to
your handler to get the same run ids: ``handler.addFilter(micro.logs.RunIdFilter())``.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from typing import IO, Any, Literal

import msgspec

from micro import context
from micro.errors import UsageError

RUN_ID_METADATA = "micro-run-id"
Format = Literal["text", "json"]
FORMATS = ("text", "json")

_encode = msgspec.json.Encoder(enc_hook=str).encode


class RunIdFilter(logging.Filter):
    """Adds ``micro_run_id`` to records made while handling a call that belongs to an agent run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "micro_run_id"):
            run_id = context.metadata().get(RUN_ID_METADATA)
            if run_id:
                record.micro_run_id = run_id
        return True


class RateLimit(logging.Filter):
    """Lets a message through at most once per ``period`` seconds; the next one says how many were held back.

    Messages are told apart by logger and template (``record.msg``, before its
    arguments), so a flood of one error from many clients is one line per period.
    The gateways put it on their loggers and uvicorn's (``micro api``, ``micro mcp``).
    """

    def __init__(self, period: float = 10.0) -> None:
        super().__init__()
        self.period = period
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg).__name__)
        now = time.monotonic()
        last, held = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.period:
            self._seen[key] = (last, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held and isinstance(record.msg, str):
            record.msg = f"{record.msg} ({held} more like it in the last {self.period:g} s were not logged)"
        return True


def rate_limit(*names: str, period: float = 10.0) -> None:
    """Put one :class:`RateLimit` on each named logger (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit(period))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k.removeprefix("micro_"): v for k, v in record.__dict__.items() if k.startswith("micro_")}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, the ``micro_*`` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"ts": ts.replace("+00:00", "Z"), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage(), **_fields(record)}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message  key=value …`` with the ``micro_*`` fields at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if not fields:
            return text
        head, sep, tail = text.partition("\n")  # keep a traceback below the fields
        return head + "  " + " ".join(f"{k}={v}" for k, v in fields.items()) + sep + tail


def configure(level: str | int = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Send micro's logs (and the root logger's) to ``stream`` (stderr) as text or JSON lines.

    Replaces a handler an earlier call installed; returns the handler.
    """
    if fmt not in FORMATS:
        raise UsageError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    if isinstance(level, str):
        name = level.upper()
        if name not in logging.getLevelNamesMapping():
            raise UsageError(f"log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
        level = logging.getLevelNamesMapping()[name]
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RunIdFilter())
    handler.set_name("micro")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "micro"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
