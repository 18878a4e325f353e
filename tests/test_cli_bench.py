"""``micro bench`` as a program: its counts match what the service counted, on both wires, and for agents.

The app under load runs in its own process (``micro run``); ``micro bench`` in another,
through the machine-local registry, as a user would run them.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import Running, micro, start_app

APP = '''
import msgspec

import micro
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.errors import NotFound


class Tally(msgspec.Struct):
    n: int = 0


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    async def Hit(self, req: Tally) -> Tally:
        """Count a call."""
        self.calls += 1
        if req.n < 0:
            raise NotFound(f"no hit {req.n}")
        return Tally(self.calls)

    async def Count(self, req: Tally) -> Tally:
        """How many Hit calls arrived."""
        return Tally(self.calls)


def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    if any(isinstance(b, ToolResultBlock) for b in messages[-1].content):
        return "counted"
    return scripted.turn(scripted.call("counter_Counter_Hit", n=1), scripted.call("counter_Counter_Hit", n=2))


counter = micro.New("counter")
counter.handle(Counter())
agent = micro.NewAgent("clerk", services=["counter"], provider=scripted.function(brain))
'''


@pytest.fixture
def counter_app(tmp_path: Path) -> Iterator[Running]:
    (tmp_path / "app.py").write_text(APP)
    app = start_app(str(tmp_path / "app.py"))
    yield app
    assert app.proc.stdout is not None
    if app.proc.poll() is None:
        app.proc.send_signal(signal.SIGINT)
        try:
            app.proc.wait(20)
        except subprocess.TimeoutExpired:
            app.proc.kill()
            app.proc.wait()
    app.proc.stdout.close()


def counted() -> int:
    res = micro("call", "counter", "Counter.Count", "{}")
    assert res.returncode == 0, res.stderr
    n: int = json.loads(res.stdout)["n"]
    return n


def bench(*args: str) -> dict[str, object]:
    res = micro("bench", *args, "--json")
    assert res.returncode == 0, res.stderr
    summary: dict[str, object] = json.loads(res.stdout)
    return summary


def test_bench_counts_match_the_service_on_both_wires(counter_app: Running, tmp_path: Path) -> None:
    native = bench("counter", "Counter.Hit", "{}", "-n", "300", "-c", "8", "--wire", "native")
    assert (native["calls"], native["ok"], native["errors"], native["wire"]) == (300, 300, {}, "native")
    assert native["via"] == {"native unix": 1}  # the app runs on this host: its Unix socket
    assert counted() == 300
    grpc = bench("counter", "Counter.Hit", "{}", "-n", "200", "-c", "8", "--wire", "grpc")
    assert (grpc["calls"], grpc["ok"], grpc["errors"], grpc["wire"], grpc["via"]) == (
        200, 200, {}, "grpc", {"grpc": 1})
    assert counted() == 500
    tcp = bench("counter", "Counter.Hit", "{}", "-n", "100", "-c", "8", "--wire", "native-tcp")
    assert (tcp["calls"], tcp["ok"], tcp["errors"], tcp["wire"], tcp["via"]) == (
        100, 100, {}, "native-tcp", {"native tcp": 1})  # forced: TCP on one host
    assert counted() == 600
    timed = bench("counter", "Counter.Hit", "{}", "-d", "300ms", "-c", "4")  # a duration: however many fit
    assert timed["ok"] == timed["calls"] and isinstance(timed["calls"], int) and timed["calls"] > 0
    assert counted() == 600 + timed["calls"]
    for summary in (native, grpc, tcp, timed):
        lat = summary["latency_ms"]
        assert isinstance(lat, dict)
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert sum(h["count"] for h in summary["histogram"]) == summary["ok"]  # type: ignore[attr-defined]


def test_bench_reports_errors_by_status_and_paces_an_open_loop(counter_app: Running, tmp_path: Path) -> None:
    lines = tmp_path / "mixed.jsonl"
    lines.write_text('{"n": 1}\n{"n": -1}\n\n{"n": 2}\n{"n": -2}\n')
    before = counted()
    mixed = bench("counter", "Counter.Hit", "--messages", str(lines), "-n", "40", "-c", "1", "--rate", "400")
    assert (mixed["calls"], mixed["ok"], mixed["errors"]) == (40, 20, {"NOT_FOUND": 20})
    assert mixed["rate"] == 400.0
    assert counted() == before + 40


def test_bench_an_agent_with_messages(counter_app: Running, tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"message": "count twice"}\n{"message": "and again"}\n')
    before = counted()
    summary = bench("clerk", "Agent.Chat", "--messages", str(chats), "-n", "6", "-c", "2")
    assert (summary["calls"], summary["ok"], summary["errors"]) == (6, 6, {})
    assert summary["tool_calls_per_run"] == 2.0  # each run called Counter.Hit twice
    assert counted() == before + 12


@pytest.mark.parametrize(("args", "needle"), [
    (("counter", "Counter.Hit", "{}", "-d", "ten"), "--duration 'ten' is not a duration"),
    (("counter", "Counter.Hit", "{}", "-d", "1s", "-n", "5"), "not both"),
    (("counter", "Counter.Hit", "{oops"), "not valid JSON"),
    (("counter", "Counter.Hit", "--messages", "/nonexistent/x.jsonl"), "--messages /nonexistent/x.jsonl"),
])
def test_bench_usage_errors_are_one_line(args: tuple[str, ...], needle: str) -> None:
    res = micro("bench", *args)
    assert res.returncode == 2
    assert needle in res.stderr
