"""A stepped flow from the command line (issue 16): the example's close-task flow waits for the lead.

``micro flow run`` starts it without its trigger, ``runs --status waiting`` lists it (the id whole at 80
columns), ``resume --input`` continues it (bad input: one line, the run unchanged), ``show`` prints each step.
"""

from __future__ import annotations

import os
import subprocess

import msgspec
from test_chat import MICRO, ROOT, example

__all__ = ["example"]  # the fixture: the example system under `micro run`


def micro_cli(*args: str, columns: str = "80") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MICRO, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "COLUMNS": columns})


def test_run_wait_resume_and_show_a_stepped_flow(example: subprocess.Popen[str]) -> None:
    listed = micro_cli("flow", "list")  # at 80 columns: each flow on one line, its steps whole
    (close,) = [line for line in listed.stdout.splitlines() if "close-task" in line]
    assert close.endswith("steps: lead → approved → closed → notified"), listed.stdout
    (onboard,) = [line for line in listed.stdout.splitlines() if "onboard-user" in line]
    assert close.index("on events.") == onboard.index("on events."), listed.stdout  # aligned

    res = micro_cli("flow", "run", "close-task", '{"task_id": "t2", "reason": "merged"}', "--json")
    assert res.returncode == 0, res.stderr
    run = msgspec.json.decode(res.stdout)
    run_id = run["id"]
    assert run["status"] == "waiting" and run["waiting"]["prompt"] == "Close task t2 (merged)?"

    table = micro_cli("flow", "runs", "close-task", "--status", "waiting")
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if run_id in line]
    assert row.split()[:3] == [run_id, "waiting", "1"] and len(row) <= 80  # id, status and time whole
    assert "waits at lead" in row
    shown = micro_cli("flow", "show", run_id, columns="200")
    assert "waits at lead: Close task t2 (merged)?" in shown.stdout
    assert f"micro flow resume {run_id} --input" in shown.stdout

    # bad input: one line, exit 1, the run still waits
    res = micro_cli("flow", "resume", run_id, "--input", '{"approved": "yes"}')
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert f"run {run_id} waits at lead: the input does not fit its schema CloseDecision" in res.stderr
    res = micro_cli("flow", "resume", run_id, "--input", "{nope")
    assert res.returncode == 2 and "--input is not JSON" in res.stderr
    assert msgspec.json.decode(micro_cli("flow", "show", run_id, "--json").stdout)["status"] == "waiting"

    res = micro_cli("flow", "resume", run_id, "--input", '{"approved": true, "note": "merged, thanks"}', "--json")
    assert res.returncode == 0, res.stderr
    done = msgspec.json.decode(res.stdout)
    assert done["status"] == "completed"
    assert done["steps"]["closed"]["record"] == {"id": "t2", "title": "Review PR #42", "due": "2026-06-02",
                                                  "assignee": "alice", "project_id": "p1", "status": "done"}
    assert done["steps"]["notified"]["record"]["message"] == "Your task Review PR #42 was closed: merged, thanks"

    shown = micro_cli("flow", "show", run_id, columns="200")
    lines = shown.stdout.splitlines()
    for step in ("lead", "approved", "closed", "notified"):
        (line,) = [ln for ln in lines if ln.split()[:1] == [step]]
        assert "completed" in line
    res = micro_cli("flow", "resume", run_id, "--input", '{"approved": true}')
    assert res.returncode == 1
    assert f"run {run_id} is completed, not waiting for input; nothing was changed" in res.stderr

    # a flow that is not there: one line naming the flows, and the closest (also for a service)
    for name in ("close-tsk", "task"):
        res = micro_cli("flow", "run", name, "{}")
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith("error: ") and "(flows: close-task, onboard-user)" in res.stderr
    assert res.stderr.startswith("error: task is a service, not a flow")

    # a refusal fails the run naming the step and the lead's reason
    run2 = msgspec.json.decode(micro_cli("flow", "run", "close-task", '{"task_id": "t3", "reason": "x"}',
                                         "--json").stdout)
    res = micro_cli("flow", "resume", run2["id"], "--input", '{"approved": false, "note": "not yet"}', "--json")
    refused = msgspec.json.decode(res.stdout)
    assert refused["status"] == "failed"
    assert refused["error"] == "step approved: BadRequest: the lead did not approve closing task t3: not yet"
    # failed, but not dead-lettered (a refusal is acknowledged: no broker gave up on it)
    failed = micro_cli("flow", "runs", "close-task", "--status", "failed")
    assert run2["id"] in failed.stdout
    dead = micro_cli("flow", "runs", "close-task", "--dead-lettered")
    assert dead.returncode == 0 and dead.stdout.strip() == "close-task has no dead-lettered runs", dead


async def test_dead_lettered_runs_of_a_flow_node_that_ignores_the_filter_are_none() -> None:
    # a flow node older than dead-lettering ignores RunsRequest.dead_lettered and lists every run; listing
    # them as dead-lettered would offer `micro flow replay` on completed runs (their side effects again)
    import anyio
    from test_dashboard import Flow

    import micro

    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
        olden = micro.Service("olden", runtime=rt)
        olden.handle(Flow())
        async with olden:
            dead = await anyio.run_process([*MICRO, "flow", "runs", "olden", "--dead-lettered"], cwd=ROOT,
                                           check=False, env={**os.environ, "COLUMNS": "80"})
            every = await anyio.run_process([*MICRO, "flow", "runs", "olden"], cwd=ROOT, check=False,
                                            env={**os.environ, "COLUMNS": "80"})
    assert dead.returncode == 0 and dead.stdout.decode().strip() == "olden has no dead-lettered runs", dead
    assert "done-1" in every.stdout.decode(), every
