"""micro publish / micro subscribe against a real nats-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
