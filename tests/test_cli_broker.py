"""micro publish / micro subscribe against a real nats-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]


def test_publish_reaches_a_subscriber_in_another_process(nats_url: str) -> None:
    env = {**os.environ, "MICRO_BROKER": nats_url}
    sub = subprocess.Popen([*MICRO, "subscribe", "events.>", "-n", "2"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert sub.stderr is not None
        assert sub.stderr.readline().strip() == "subscribed to events.>"
        for i, body in enumerate(['{"user": "dana"}', '{"user": "eve"}']):
            res = subprocess.run([*MICRO, "publish", f"events.user.n{i}", body, "-H", "trace=t1"],
                                 capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip() == f"published to events.user.n{i}"
        out, _ = sub.communicate(timeout=60)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(m["topic"], m["data"]) for m in lines] == [("events.user.n0", {"user": "dana"}),
                                                       ("events.user.n1", {"user": "eve"})]
    assert lines[0]["headers"]["trace"] == "t1" and lines[0]["id"]
    assert sub.returncode == 0


def test_publish_rejects_bad_json_and_bad_broker_urls(nats_url: str) -> None:
    res = subprocess.run([*MICRO, "publish", "t", "{nope"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "MICRO_BROKER": nats_url})
    assert res.returncode == 2 and "not valid JSON" in res.stderr
    res = subprocess.run([*MICRO, "publish", "t", "{}", "--broker", "kafka://x"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 2 and "kafka://x" in res.stderr
    res = subprocess.run([*MICRO, "publish", "t", "{}", "--broker", "nats://127.0.0.1:1"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1 and "Unavailable" in res.stderr and "127.0.0.1:1" in res.stderr


@pytest.mark.parametrize("command", [["publish", "events.x", "{}"], ["subscribe", "events.>", "-n", "1"]])
def test_the_in_process_broker_is_refused_with_what_to_set(command: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "MICRO_BROKER": "memory://", "MICRO_HOME": str(tmp_path)}  # an app's default
    res = subprocess.run([*MICRO, *command], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert res.returncode == 2, res
    assert "the broker is memory://" in res.stderr and "MICRO_BROKER" in res.stderr and "local://" in res.stderr
    assert "published" not in res.stdout  # nothing claims a delivery that cannot happen


def test_publish_on_local_reaches_a_subscriber_in_another_process(tmp_path: Path) -> None:
    env = {**os.environ, "MICRO_HOME": str(tmp_path), "MICRO_REGISTRY": "local://"}  # no MICRO_BROKER: local://
    env.pop("MICRO_BROKER", None)
    sub = subprocess.Popen([*MICRO, "subscribe", "events.>", "-n", "1"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        assert sub.stderr is not None and sub.stderr.readline().strip() == "subscribed to events.>"
        res = subprocess.run([*MICRO, "publish", "events.user.created", '{"id": "u9"}'], capture_output=True,
                             text=True, cwd=ROOT, timeout=60, env=env)
        assert res.returncode == 0, res.stderr
        out, _ = sub.communicate(timeout=60)
    finally:
        if sub.poll() is None:
            sub.kill()
    (line,) = out.splitlines()
    assert json.loads(line)["data"] == {"id": "u9"}
