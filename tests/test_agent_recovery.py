"""Crash recovery and resume across OS processes (issue 15), over real gRPC and the machine-local registry.

A counting service that honours idempotency keys runs in one process; the agent in
another. The agent's run makes two calls in its first turn, then a slow one and a
fast one in its second; the test SIGKILLs the agent while the slow call is in flight,
starts a new agent process, and runs ``micro agent resume keeper --interrupted``:
the first turn's calls are not made again (their results come from the checkpoint),
the in-flight call is made again with the same idempotency key, and every call's
work happened exactly once. Then a run that waits for approval is resumed by yet
another agent process. Processes signal readiness on stdout; nothing sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

APPS = Path(__file__).resolve().parent / "apps"
ROOT = APPS.parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]


def start(app: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(APPS / app)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=os.environ.copy())
    expect(proc, "ready")
    return proc


def expect(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # blocks until the process says it (or exits)
        seen.append(line)
        if line.strip() == text:
            return
    pytest.fail(f"the process exited before printing {text!r}:\n" + "".join(seen))


def micro_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MICRO, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def stats() -> Any:
    res = micro_cli("call", "counter", "Inspect.Stats", "{}")
    assert res.returncode == 0, res.stderr
    return msgspec.json.decode(res.stdout)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(20)
        if p.stdout is not None:
            p.stdout.close()


def test_sigkill_mid_turn_then_resume_interrupted_repeats_no_completed_call(
        procs: list[subprocess.Popen[str]]) -> None:
    counter = start("recovery_counter.py")
    procs.append(counter)
    first = start("recovery_agent.py")
    procs.append(first)
    chat = subprocess.Popen([*MICRO, "call", "keeper", "Agent.Chat", '{"message": "count"}'], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expect(counter, "slow started")  # the second turn's calls are in flight
    first.send_signal(signal.SIGKILL)
    first.wait(20)
    chat.communicate(timeout=60)
    assert chat.returncode != 0  # its agent died under it

    runs = micro_cli("agent", "runs", "keeper", "--status", "interrupted", "--json")
    assert runs.returncode != 0 and "keeper" in runs.stderr  # no keeper is up to ask

    second = start("recovery_agent.py")
    procs.append(second)
    (run,) = msgspec.json.decode(micro_cli("agent", "runs", "keeper", "--status", "interrupted", "--json").stdout)
    states = {c["input"]["item"]: c["state"] for c in run["tool_calls"]}
    assert states["a"] == states["b"] == "done" and states["c"] == "running"

    micro_cli("call", "counter", "Counter.Open", "{}")  # the slow call may finish now
    res = micro_cli("agent", "resume", "keeper", "--interrupted", "--json")
    assert res.returncode == 0, res.stderr
    (done,) = msgspec.json.decode(res.stdout)
    assert (done["run_id"], done["status"]) == (run["id"], "completed")
    assert done["reply"] == 'counted: {"item":"c","count":1}, {"item":"d","count":1}'

    s = stats()
    assert s["work"] == {"a": 1, "b": 1, "c": 1, "d": 1}  # every side effect happened exactly once
    assert s["requests"]["a"] == s["requests"]["b"] == 1  # completed before the crash: not called again
    assert s["requests"]["c"] == 2  # in flight at the crash: re-issued ...
    assert len(set(s["keys"]["c"])) == 1 and s["keys"]["c"][0].startswith(f"keeper/{run['id']}:counter.Counter.Slow:")
    # ... with the same key, so the counter did its work once
    assert micro_cli("agent", "resume", "keeper", "--interrupted").stdout.strip() == "keeper has no interrupted runs"

    # a run that waits for approval, paused by this process, is approved through another one
    res = micro_cli("call", "keeper", "Agent.Chat", '{"message": "reset"}')
    paused = msgspec.json.decode(res.stdout)
    assert paused["status"] == "paused" and paused["pending"][0]["tool"] == "counter_Counter_Reset"
    second.send_signal(signal.SIGKILL)
    second.wait(20)
    third = start("recovery_agent.py")
    procs.append(third)
    res = micro_cli("agent", "approve", "keeper", paused["run_id"], "--json")
    assert res.returncode == 0, res.stderr
    approved = msgspec.json.decode(res.stdout)
    assert (approved["status"], approved["reply"]) == ("completed", 'reset: {"item":"a","count":0}')
    assert stats()["work"]["reset a"] == 1
