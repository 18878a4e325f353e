"""A run's timeline: bars on a time axis, laid out for the dashboard's SVG.

An agent run's record holds each model turn's start, duration and tokens (``turns``)
and each tool call's start and duration; the turns are drawn on the first lane with
their token counts (a failed turn as an error), beside the time a decided call waited
for a person (its ``paused`` to its ``started``): a "waiting" bar. A record written
before turns were recorded has none: its model turns are drawn as the stretches in
which no tool call ran (from the start to the first call, between one turn's calls and
the next, from the last call to the end). Tool calls that overlap (a turn's calls run
concurrently) go side by side on lanes of their own. A flow run's steps each get a
lane from their recorded start and duration.
The template (``_timeline.html``) draws the bars; this module only measures them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

WIDTH = 880  # px: the drawing area of the SVG (the page scales it)
LANE = 26    # px per lane
LABELS = 170  # px left of the axis for lane labels


class Bar(msgspec.Struct, frozen=True):
    """One bar: its lane, start and length in seconds from the run's start, label, kind and hover text."""

    lane: int
    start: float
    seconds: float
    label: str
    kind: str  # model | tool | error | pending | step | failed | waiting
    title: str


class Drawn(msgspec.Struct, frozen=True):
    """A bar placed in pixels; its label starts at ``label_x``, anchored ``start`` (or ``end``: a label
    that would run past the drawing's right edge ends at the bar's right end instead)."""

    x: float
    y: float
    w: float
    label: str
    kind: str
    title: str
    label_x: float = 0.0
    anchor: str = "start"


class Timeline(msgspec.Struct, frozen=True):
    """What the SVG template draws: bars, lane names, ticks, the total in seconds and the SVG's size."""

    bars: list[Drawn]
    lanes: list[str]
    ticks: list[tuple[float, str]]
    total: float
    width: int
    height: int


def _lanes(calls: Sequence[tuple[float, float]]) -> list[int]:
    """Greedy interval lanes: each call takes the first lane whose last call has ended."""
    ends: list[float] = []
    out = []
    for start, seconds in calls:
        for i, end in enumerate(ends):
            if end <= start + 1e-9:
                ends[i] = start + seconds
                out.append(i)
                break
        else:
            ends.append(start + seconds)
            out.append(len(ends) - 1)
    return out


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def agent_bars(run: Mapping[str, Any], now: float | None = None) -> list[Bar]:
    """The bars of an agent run record (``AgentInfo.Run``'s ``run``, as JSON)."""
    t0 = float(run.get("started") or 0.0)
    end = float(run.get("finished") or 0.0) or float(run.get("updated") or 0.0) or (now or time.time())
    calls = sorted(run.get("tool_calls") or [], key=lambda c: float(c.get("started") or t0))
    spans = []
    for c in calls:
        start = max(float(c.get("started") or t0) - t0, 0.0)
        seconds = float(c.get("seconds") or 0.0)
        if c.get("state") in ("running", "pending"):
            seconds = max(end - t0 - start, 0.0)
        spans.append((start, seconds))
    lanes = _lanes(spans)
    bars = []
    for c, (start, seconds), lane in zip(calls, spans, lanes, strict=True):
        kind = "pending" if c.get("state") == "pending" else "error" if c.get("is_error") else "tool"
        args = msgspec.json.encode(c.get("input") or {}).decode()
        title = f"{c.get('name', '?')}({_short(args, 200)}) {seconds * 1000:.1f} ms"
        if c.get("result"):
            title += f" → {_short(str(c['result']), 200)}"
        bars.append(Bar(lane + 1, start, seconds, str(c.get("name", "?")), kind, title))
    # the waits for a person of decided calls: from the pause to the run going on (not the model's time)
    waits = []
    for c in calls:
        paused = float(c.get("paused") or 0.0)
        started = float(c.get("started") or t0)
        if paused and c.get("state") != "pending" and started > paused:
            waits.append((max(paused - t0, 0.0), started - paused))
            bars.append(Bar(0, waits[-1][0], waits[-1][1], "waiting for a person", "waiting",
                            f"{c.get('name', '?')} waited for a person: {_seconds(started - paused)}"))
    turns = sorted(run.get("turns") or [], key=lambda t: float(t.get("started") or t0))
    # before the first recorded turn: a run that spans the upgrade to recorded turns has calls (and waits)
    # from before it, whose model turns are, as in an older record, the gaps between them
    first = max(float(turns[0].get("started") or t0) - t0, 0.0) if turns else None
    if first is None:
        total = max(end - t0, max((s + d for s, d in [*spans, *waits]), default=0.0))
        before = [*spans, *waits]
    else:
        total = first
        before = [(s, d) for s, d in [*spans, *waits] if s < first - 1e-6]
    inferred = _gaps(before, total) if first is None or before else []
    for n, (start, seconds) in enumerate(inferred, 1):
        bars.append(Bar(0, start, seconds, f"model turn {n}", "model",
                        f"model turn {n}: {seconds * 1000:.1f} ms" + (" (inferred: before turns were recorded)"
                                                                       if first is not None else "")))
    for n, t in enumerate(turns, len(inferred) + 1):  # recorded: each model call as it was
        start = max(float(t.get("started") or t0) - t0, 0.0)
        seconds = float(t.get("seconds") or 0.0)
        tokens = f"{int(t.get('input_tokens') or 0)} in / {int(t.get('output_tokens') or 0)} out"
        if t.get("error"):
            bars.append(Bar(0, start, seconds, f"model turn {n} failed", "error",
                            f"model turn {n}: {_seconds(seconds)}, failed: {_short(str(t['error']), 200)}"))
        else:
            bars.append(Bar(0, start, seconds, f"model turn {n} · {tokens}", "model",
                            f"model turn {n}: {_seconds(seconds)}, {tokens} tokens"))
    return bars


def _gaps(busy: Sequence[tuple[float, float]], until: float) -> list[tuple[float, float]]:
    """The stretches of ``[0, until)`` outside every ``(start, seconds)`` of ``busy``: an older record's model turns."""
    gaps = []
    cursor = 0.0
    for start, seconds in [*sorted(busy), (until, 0.0)]:
        if start > cursor + 1e-6:
            gaps.append((cursor, start - cursor))
        cursor = max(cursor, start + seconds)
    return gaps


def _seconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.0f} s"


def flow_bars(run: Mapping[str, Any], now: float | None = None) -> list[Bar]:
    """The bars of a stepped flow run record (``Flow.Show``'s ``run``, as JSON): one lane per step."""
    t0 = float(run.get("started") or 0.0)
    end = float(run.get("finished") or 0.0) or (now or time.time())
    bars = []
    for lane, (name, info) in enumerate((run.get("trace") or {}).items()):
        start = max(float(info.get("started") or t0) - t0, 0.0)
        status = str(info.get("status", ""))
        seconds = float(info.get("seconds") or 0.0)
        if status in ("running", "waiting"):
            seconds = max(end - t0 - start, 0.0)
        kind = {"failed": "failed", "waiting": "waiting"}.get(status, "step")
        title = f"{name} ({info.get('kind', '')}) {status}, {seconds * 1000:.1f} ms, {info.get('attempts', 0)} attempts"
        if info.get("error"):
            title += f": {_short(str(info['error']), 200)}"
        bars.append(Bar(lane, start, seconds, str(name), kind, title))
    return bars


CHAR = 6.5  # px: about the width of one character of a bar's label


def layout(bars: Sequence[Bar], lane_names: Sequence[str] | None = None, *, total: float = 0.0) -> Timeline:
    """Place ``bars`` in pixels, with about six round ticks on the axis; the axis spans ``total`` seconds at
    least (the whole run: the stretches between bars are the loop's own time)."""
    total = max(max((b.start + b.seconds for b in bars), default=0.0), total) or 0.001
    lanes = max((b.lane for b in bars), default=-1) + 1
    names = list(lane_names) if lane_names is not None else ["model"] + [f"tools {i}" for i in range(1, lanes)]
    if len(names) < lanes:
        names += [""] * (lanes - len(names))
    scale = WIDTH / total
    drawn = []
    for b in bars:
        x, w = LABELS + b.start * scale, max(b.seconds * scale, 2.0)
        if x + 4 + len(b.label) * CHAR > LABELS + WIDTH + 20 and x + w - 4 - len(b.label) * CHAR >= LABELS:
            drawn.append(Drawn(x, 20 + b.lane * LANE, w, b.label, b.kind, b.title, x + w - 4, "end"))
        else:
            drawn.append(Drawn(x, 20 + b.lane * LANE, w, b.label, b.kind, b.title, x + 4))
    step = _tick(total)
    ticks = []
    t = 0.0
    while t <= total + 1e-9:
        ticks.append((LABELS + t * scale, f"{t * 1000:.0f} ms" if step < 1 else f"{t:g} s"))
        t += step
    return Timeline(drawn, names[:lanes], ticks, total, LABELS + WIDTH + 20, 20 + lanes * LANE + 24)


def _tick(total: float) -> float:
    for step in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300, 600, 3600):
        if total / step <= 6:
            return float(step)
    return 86400.0
