"""Runs that wait, from the command line (issue 15): the example's task-mgr asks before deleting a task.

``micro chat`` one-shot prints what a paused run waits for and the commands that continue it;
``micro agent pending | approve | answer | cancel`` and ``runs --status`` decide and list; the
REPL asks ``approve? [y/N/reason]`` inline, in a real terminal (pexpect).
"""

from __future__ import annotations

import os
import subprocess

import msgspec
import pexpect
from test_chat import MICRO, ROOT, example

__all__ = ["example"]  # the fixture: the example system under `micro run`


def micro_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MICRO, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200"})


def paused_run() -> dict[str, object]:
    (run,) = msgspec.json.decode(micro_cli("agent", "runs", "task-mgr", "--status", "paused", "--json").stdout)
    assert isinstance(run, dict)
    return run


def test_approve_deny_cancel_and_bad_input_from_the_command_line(example: subprocess.Popen[str]) -> None:
    res = micro_cli("chat", "--agent", "task-mgr", "-m", "Delete task t7")
    assert res.returncode == 0, res.stderr
    run = paused_run()
    run_id = run["id"]
    assert res.stdout.splitlines() == [
        "[task-mgr] Deleting task t7...",
        '→ task_Task_Delete({"id":"t7"})',
        '⏸ task_Task_Delete({"id":"t7"}) needs approval',
        f'[task-mgr] waiting for approval: micro agent approve task-mgr {run_id}  (or --deny --reason "…"; '
        f"micro agent cancel task-mgr {run_id})",
    ]
    pending = micro_cli("agent", "pending", "task-mgr")
    assert pending.returncode == 0, pending.stderr
    assert f"{run_id}  paused" in pending.stdout and '⏸ task_Task_Delete({"id":"t7"})  (call ' in pending.stdout

    # the default session waits: a new message is refused in one line naming the run and the commands
    res = micro_cli("chat", "--agent", "task-mgr", "-m", "What tasks are overdue for Bob?")
    assert res.returncode == 1
    assert res.stderr.strip().startswith(f"error: agent task-mgr: the default session has run {run_id} waiting "
                                         "for approval of task_Task_Delete")

    # bad input: one line, exit 1, the run unchanged
    res = micro_cli("agent", "answer", "task-mgr", run_id, "yes")
    assert res.returncode == 1 and "it asked no question, so there is nothing to answer" in res.stderr
    res = micro_cli("agent", "approve", "task-mgr", "no-such-run")
    assert res.returncode == 1 and "agent task-mgr has no run 'no-such-run'" in res.stderr
    res = micro_cli("agent", "approve", "task-mgr", run_id, "--call", "nope")
    assert res.returncode == 1 and "it has no pending approval 'nope'" in res.stderr
    assert paused_run() == run

    res = micro_cli("agent", "approve", "task-mgr", run_id, "--deny", "--reason", "keep it")
    assert res.returncode == 0, res.stderr
    assert "task_Task_Delete failed: the call to task_Task_Delete was not approved by a person: keep it" in res.stdout
    assert "t7" in micro_cli("call", "task", "Task.List", "{}").stdout  # not deleted
    res = micro_cli("agent", "approve", "task-mgr", run_id)
    assert res.returncode == 1 and f"run {run_id} is completed, not waiting" in res.stderr
    assert micro_cli("agent", "runs", "task-mgr", "--status", "paused").stdout.strip() == "task-mgr has no paused runs"

    # approve: the call is made, once
    micro_cli("chat", "--agent", "task-mgr", "-m", "Delete task t6")
    res = micro_cli("agent", "approve", "task-mgr", str(paused_run()["id"]))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "Deleted: Fix login bug (due May 28)"
    assert '"t6"' not in micro_cli("call", "task", "Task.List", "{}").stdout

    # cancel
    micro_cli("chat", "--agent", "task-mgr", "--session", "s2", "-m", "Delete task t5")
    other = str(paused_run()["id"])
    res = micro_cli("agent", "cancel", "task-mgr", other, "--reason", "wrong task")
    assert (res.returncode, res.stdout.strip()) == (0, f"run {other} cancelled")
    (cancelled,) = msgspec.json.decode(micro_cli("agent", "runs", "task-mgr", "--status", "cancelled", "--json").stdout)
    assert cancelled["error"] == "cancelled by a person: wrong task"


def test_the_chat_repl_asks_for_approval_inline_in_a_real_terminal(example: subprocess.Popen[str]) -> None:
    env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(MICRO[0], [*MICRO[1:], "chat", "--agent", "task-mgr"], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=30, dimensions=(40, 200))
    try:
        child.expect("Ctrl-D exits")
        child.expect(">")
        child.sendline("Delete task t5")
        child.expect(r"⏸ task_Task_Delete\(\{\"id\":\"t5\"\}\) needs approval")
        child.expect(r"\[task-mgr\] approve task_Task_Delete\? \[y/N/reason\]")
        child.sendline("not this one")
        child.expect("not approved by a person: not this one")
        child.expect(">")
        child.sendline("Delete task t5")
        child.expect(r"approve task_Task_Delete\? \[y/N/reason\]")
        child.sendline("y")
        child.expect(r"Deleted: Prepare launch checklist \(due January 15\)")
        child.expect(">")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert '"t5"' not in micro_cli("call", "task", "Task.List", "{}").stdout
