"""micro chat and the router: routing, concurrent dispatch, rendering, and the program itself."""

from __future__ import annotations

import datetime as dt
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pexpect
import pytest

import micro
from micro.agent.router import AgentInfo, KeywordRouter, Route, Router, discover
from micro.ai import Message, ToolSpec, scripted
from micro.cli.chat import Printer, turn

ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]


def info(name: str, *services: str) -> AgentInfo:
    return AgentInfo(name, list(services))


AGENTS = [info("comms-mgr", "notification", "email"), info("project-mgr", "task", "project", "milestone"),
          info("task-mgr", "task", "project")]


async def test_keyword_router_picks_the_specific_agents() -> None:
    r = KeywordRouter()
    routes = await r.route("Reschedule Alice's tasks and notify her", AGENTS)
    assert [x.agent for x in routes] == ["task-mgr", "comms-mgr"]
    assert [x.agent for x in await r.route("How are the milestones?", AGENTS)] == ["project-mgr"]
    assert await r.route("hello", AGENTS) == [Route("project-mgr", "hello", guessed=True)]  # the broadest, said
    assert not any(x.guessed for x in await r.route("Email Bob", AGENTS))
    assert [x.agent for x in await r.route("anything", AGENTS[:1])] == ["comms-mgr"]


async def test_model_router_uses_one_tool_call_and_drops_unknown_agents() -> None:
    def decide(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn:
        assert [t.name for t in tools] == ["route"]
        enum = tools[0].input_schema["properties"]["routes"]["items"]["properties"]["agent"]["enum"]
        assert enum == ["comms-mgr", "project-mgr", "task-mgr"]
        return scripted.call("route", routes=[
            {"agent": "task-mgr", "message": "reschedule Alice's tasks"},
            {"agent": "ghost", "message": "boo"},
            {"agent": "comms-mgr", "message": "notify Alice"},
        ])

    model = scripted.function(decide)
    routes = await Router(model).route("reschedule Alice's tasks and notify her", AGENTS)
    assert routes == [Route("task-mgr", "reschedule Alice's tasks"), Route("comms-mgr", "notify Alice")]
    assert "comms-mgr: manages notification, email" in (model.calls[0].system or "")
    assert len(model.calls) == 1
    assert await Router(model).route("x", AGENTS[:1]) == [Route("comms-mgr", "x")]  # one agent: no model call
    assert len(model.calls) == 1


def test_printer_labels_lines_when_several_agents_answer() -> None:
    out: list[str] = []
    p = Printer(out.append, labelled_lines=True)
    p.event("a", {"type": "text", "text": "Hel"})
    p.event("b", {"type": "text", "text": "Other\n"})
    p.event("a", {"type": "text", "text": "lo\nWorld"})
    p.event("a", {"type": "tool_start", "tool_call": {"name": "t_X_Y", "input": '{"k":1}'}})
    p.event("a", {"type": "tool_end", "tool_call": {"result": "x" * 500, "is_error": False}})
    p.done("a")
    text = "".join(out)
    assert text.splitlines()[:4] == ["[b] Other", "[a] Hello", "[a] World", '[a] → t_X_Y({"k":1})']
    assert text.splitlines()[4].startswith("[a] ← xxx") and text.splitlines()[4].endswith("…")
    assert len(text.splitlines()[4]) < 200


def test_printer_puts_the_label_on_the_first_line_the_agent_writes() -> None:
    out: list[str] = []
    p = Printer(out.append, labelled_lines=False)
    p.start("notes-agent")
    p.event("notes-agent", {"type": "tool_start", "tool_call": {"name": "f", "input": "{}"}})
    p.event("notes-agent", {"type": "tool_end", "tool_call": {"result": "[]", "is_error": False}})
    p.event("notes-agent", {"type": "text", "text": "No notes."})
    p.done("notes-agent")
    assert "".join(out) == "[notes-agent] → f({})\n← []\nNo notes.\n"  # no empty "[notes-agent] " line


def test_printer_streams_inline_for_one_agent() -> None:
    out: list[str] = []
    p = Printer(out.append, labelled_lines=False)
    p.start("task-mgr")
    p.event("task-mgr", {"type": "text", "text": "Checking..."})
    p.event("task-mgr", {"type": "tool_start", "tool_call": {"name": "f", "input": "{}"}})
    p.event("task-mgr", {"type": "tool_end", "tool_call": {"result": "boom", "is_error": True}})
    p.event("task-mgr", {"type": "text", "text": "Done."})
    p.done("task-mgr")
    assert "".join(out) == "[task-mgr] Checking...\n→ f({})\n✗ boom\nDone.\n"


class Echo(msgspec.Struct):
    text: str


class Tool:
    async def Echo(self, req: Echo) -> Echo:
        """Echo the text."""
        return req


async def test_several_agents_are_asked_concurrently(capsys: pytest.CaptureFixture[str]) -> None:
    arrived = 0
    all_in = anyio.Event()

    async def barrier(messages: list[Message], tools: list[ToolSpec]) -> str:
        nonlocal arrived
        if len(messages) == 1:  # the first model call of each agent's run
            arrived += 1
            if arrived == 3:
                all_in.set()
            await all_in.wait()  # a sequential dispatch never gets the third agent here
        return f"done after {len(messages)} message(s)"

    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        svc = micro.New("echo", runtime=rt)
        svc.handle(Tool())
        agents = [micro.NewAgent(n, services=["echo"], provider=scripted.function(barrier), runtime=rt)
                  for n in ("alpha-mgr", "beta-mgr", "gamma-mgr")]
        async with svc, agents[0], agents[1], agents[2]:
            found = await discover(rt.registry)
            assert [a.name for a in found] == ["alpha-mgr", "beta-mgr", "gamma-mgr"]
            assert found[0].services == ["echo"]

            class All:
                async def route(self, message: str, agents: list[AgentInfo]) -> list[Route]:
                    return [Route(a.name, message) for a in agents]

            with anyio.fail_after(10):
                asked = await turn(rt, All(), "hello all", only=None, session="", timeout=10)
    assert asked == 3
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == [f"[{n}] done after 1 message(s)" for n in ("alpha-mgr", "beta-mgr", "gamma-mgr")]


# -- the program ------------------------------------------------------------------------------


def _start(path: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*MICRO, "run", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy(), cwd=ROOT)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Ctrl-C to stop" in line:
            return proc
    proc.wait(10)
    proc.stdout.close()
    pytest.fail("micro run exited early:\n" + "".join(seen))


@pytest.fixture
def example() -> Iterator[subprocess.Popen[str]]:
    proc = _start("examples/tasks")
    yield proc
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def test_agent_list(example: subprocess.Popen[str]) -> None:
    res = subprocess.run([*MICRO, "agent", "list"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = [line.rstrip() for line in res.stdout.splitlines()]
    assert lines[4:6] == ["◆ task-mgr     manages: task, project",  # at 80 columns: nothing wrapped or cut
                          "               model: scripted demo model (set ANTHROPIC_API_KEY to use Claude)"]
    assert lines[2] == "◆ project-mgr  manages: task, project, milestone"
    assert len(lines) == 6 and all(len(line) <= 80 for line in lines)
    res = subprocess.run([*MICRO, "agent", "list", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    agents = {a["name"]: a["services"] for a in msgspec.json.decode(res.stdout)}
    assert agents == {"comms-mgr": ["notification", "email"], "project-mgr": ["task", "project", "milestone"],
                      "task-mgr": ["task", "project"]}


def test_one_shot_chat_routes_to_one_agent(example: subprocess.Popen[str]) -> None:
    res = subprocess.run([*MICRO, "chat", "-m", "What tasks are overdue for Alice?"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "[task-mgr] Checking overdue tasks..."
    assert lines[1] == '→ task_Task_ListOverdue({"user_id":"alice"})'
    assert lines[2].startswith('← {"records":[{"id":"t1"')
    assert lines[3:] == ["Alice has 3 overdue tasks:", "1. Write quarterly report (due June 1)",
                         "2. Review PR #42 (due June 2)", "3. Update deployment docs (due June 3)"]
    assert res.stderr == ""  # the router did not guess


def test_chat_says_when_the_keyword_router_guessed(example: subprocess.Popen[str]) -> None:
    res = subprocess.run([*MICRO, "chat", "-m", "Good morning"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("[project-mgr] ")
    assert " ".join(res.stderr.split()) == (
        "(no agent's name or services in the message: asking project-mgr, which manages task, project, "
        "milestone; name a service, or choose with --agent NAME)")


@pytest.mark.parametrize("message", ["", "   "])
def test_an_empty_message_is_one_line(message: str) -> None:
    res = subprocess.run([*MICRO, "chat", "-m", message], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1
    assert res.stderr == "error: BadRequest: micro chat: the message is empty (-m takes the text to send)\n"


def test_agent_runs_show_history_and_inspect(example: subprocess.Popen[str]) -> None:
    def micro_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MICRO, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**os.environ, "COLUMNS": "200"})

    res = micro_cli("chat", "--agent", "task-mgr", "--session", "cli-test", "-m", "What tasks are overdue for Alice?")
    assert res.returncode == 0, res.stderr
    res = micro_cli("agent", "runs", "task-mgr", "--json")
    assert res.returncode == 0, res.stderr
    (run,) = msgspec.json.decode(res.stdout)
    assert (run["agent"], run["session"], run["status"]) == ("task-mgr", "cli-test", "completed")
    assert [c["name"] for c in run["tool_calls"]] == ["task_Task_ListOverdue"]
    assert run["reply"].startswith("Alice has 3 overdue tasks")
    table = micro_cli("agent", "runs", "task-mgr")
    assert run["id"] in table.stdout and "task_Task_ListOverdue" in table.stdout
    assert "  completed  1 tool call  " in table.stdout  # not "1 tool calls"
    assert msgspec.json.decode(micro_cli("agent", "show", "task-mgr", run["id"], "--json").stdout) == run
    shown = msgspec.json.decode(micro_cli("agent", "show", "task-mgr", run["id"]).stdout)
    started = dt.datetime.fromtimestamp(run["started"])  # a local date-time, not seconds since the epoch
    assert shown["started"] == started.isoformat(" ", "milliseconds")
    assert shown["tool_calls"][0]["started"].startswith(started.strftime("%Y-%m-%d "))
    assert shown["updated"] == dt.datetime.fromtimestamp(run["updated"]).isoformat(" ", "milliseconds")
    assert (run["expires"], shown["expires"]) == (0.0, "-")  # a completed run does not expire
    assert shown["tool_calls"][0]["seconds"] == round(run["tool_calls"][0]["seconds"], 3)
    times = ("started", "finished", "updated", "expires", "tool_calls")
    assert not any(isinstance(v, float) and v > 1e9 for v in shown.values())  # no epoch seconds left
    assert {k: v for k, v in shown.items() if k not in times} == {k: v for k, v in run.items() if k not in times}
    history = micro_cli("agent", "history", "task-mgr", "--session", "cli-test")
    assert history.returncode == 0, history.stderr
    assert history.stdout.splitlines()[:3] == ["you: What tasks are overdue for Alice?",
                                               "task-mgr: Checking overdue tasks...",
                                               '  → task_Task_ListOverdue({"user_id":"alice"})']
    res = micro_cli("chat", "--agent", "task-mgr", "--session", "cli-test", "-m", "What tasks are overdue for Bob?")
    assert res.returncode == 0, res.stderr
    tail = micro_cli("agent", "history", "task-mgr", "--session", "cli-test", "--limit", "1")
    assert tail.stdout.splitlines() == [  # the last turn, from the question on (it ended on 3 messages of 4)
        "you: What tasks are overdue for Bob?", "task-mgr: Checking overdue tasks...",
        '  → task_Task_ListOverdue({"user_id":"bob"})',
        '  ← {"records":[{"id":"t6","title":"Fix login bug","due":"2026-05-28","assignee":"bob","project_id":"p1",'
        '"status":"open"}],"total":1}',
        "task-mgr: Bob has 1 overdue task:", "1. Fix login bug (due May 28)"]
    two = msgspec.json.decode(micro_cli("agent", "history", "task-mgr", "--session", "cli-test", "-n", "2",
                                        "--json").stdout)
    assert [m["role"] for m in two] == ["user", "assistant", "user", "assistant"] * 2
    inspect = micro_cli("agent", "inspect", "task-mgr", "--json")
    desc = msgspec.json.decode(inspect.stdout)
    assert desc["services"] == ["task", "project"] and desc["provider"]["model"].startswith("scripted demo model")
    assert "task_Task_ListOverdue" in {t["name"] for t in desc["tools"]}
    assert "task_Task_ListOverdue" in micro_cli("agent", "inspect", "task-mgr").stdout
    res = micro_cli("agent", "runs", "task")
    assert res.returncode == 1
    assert res.stderr.strip() == ("error: task is a service, not an agent (agents: comms-mgr, project-mgr, task-mgr); "
                                  "did you mean task-mgr?")
    res = micro_cli("agent", "inspect", "nosuch")
    assert res.returncode == 1
    assert res.stderr.strip() == ("error: no agent 'nosuch' is registered (agents: comms-mgr, project-mgr, task-mgr) "
                                  "(`micro agent list` lists them)")
    res = micro_cli("agent", "history", "comms")
    assert res.returncode == 1 and res.stderr.strip().endswith("; did you mean comms-mgr?")
    for command in (("cancel", "tsk-mgr", "some-run"), ("resume", "tsk-mgr", "--interrupted")):
        res = micro_cli("agent", *command)
        assert res.returncode == 1 and res.stderr.strip() == (
            "error: no agent 'tsk-mgr' is registered (agents: comms-mgr, project-mgr, task-mgr); did you mean "
            "task-mgr?"), res.stderr
    res = micro_cli("agent", "show", "task-mgr", "no-such-run")
    assert res.returncode == 1 and "has no run 'no-such-run'" in res.stderr
    everything = micro_cli("agent", "history", "task-mgr", "--session", "cli-test", "--all", "--json")
    window = micro_cli("agent", "history", "task-mgr", "--session", "cli-test", "--json")
    assert msgspec.json.decode(everything.stdout) == msgspec.json.decode(window.stdout)  # nothing compacted
    forgot = micro_cli("agent", "forget", "task-mgr", "--session", "cli-test")
    assert forgot.returncode == 0 and forgot.stdout.strip() == "task-mgr forgot session 'cli-test'", forgot.stderr
    for args in (("history", "task-mgr", "--session", "cli-test", "--all"),
                 ("runs", "task-mgr", "--session", "cli-test")):
        assert msgspec.json.decode(micro_cli("agent", *args, "--json").stdout) == []
    res = micro_cli("agent", "forget", "task-mgr", "--session", "a/b")
    assert res.returncode == 1 and "'/' and '#' are not allowed" in res.stderr


def test_chat_reads_messages_from_stdin_and_reaches_two_agents(example: subprocess.Popen[str]) -> None:
    res = subprocess.run([*MICRO, "chat"], input="Reschedule Alice's overdue tasks and notify her\n",
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert all(line.startswith(("[task-mgr] ", "[comms-mgr] ")) for line in lines)
    assert '[comms-mgr] → notification_Notification_Send({"user_id":"alice","message":"Your overdue tasks ' \
           'were rescheduled."})' in lines
    updates = [line for line in lines if line.startswith("[task-mgr] → task_Task_Update(")]
    assert len(updates) == 3
    assert sum("Rescheduled:" in line for line in lines) == 3


def test_chat_with_an_unknown_agent_fails_in_one_line(example: subprocess.Popen[str]) -> None:
    res = subprocess.run([*MICRO, "chat", "--agent", "nope", "-m", "hi"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 1
    assert res.stderr.strip() == ("error: no agent 'nope' is registered (agents: comms-mgr, project-mgr, task-mgr) "
                                  "(`micro agent list` lists them)")
    res = subprocess.run([*MICRO, "chat", "--agent", "task", "-m", "hi"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 1 and res.stderr.strip().endswith("did you mean task-mgr?")


def test_chat_without_agents_says_how_to_start_one() -> None:
    res = subprocess.run([*MICRO, "chat", "-m", "hi"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1
    assert "no agents are registered" in res.stderr and "micro run" in res.stderr


def test_interactive_chat_in_a_real_terminal(example: subprocess.Popen[str]) -> None:
    env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(MICRO[0], [*MICRO[1:], "chat", "--agent", "task-mgr"], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=30, dimensions=(40, 200))
    child.logfile_read = seen = io.StringIO()
    try:
        child.expect("Ctrl-D exits")
        child.expect(">")
        child.sendline("   ")  # a blank line sends nothing: no turn, no error, the prompt again
        child.expect(">")
        child.sendline("What tasks are overdue for Bob?")
        child.expect(r"\[task-mgr\] Checking overdue tasks\.\.\.")
        child.expect(r"→ task_Task_ListOverdue\(\{\"user_id\":\"bob\"\}\)")
        child.expect("Bob has 1 overdue task:")
        child.expect("1. Fix login bug")
        child.expect(">")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "error" not in seen.getvalue() and "Traceback" not in seen.getvalue()
    assert seen.getvalue().count("Checking overdue tasks") == 1  # one turn: the blank line was none
    history = Path(os.environ["MICRO_HOME"]) / "chat_history"
    assert "What tasks are overdue for Bob?" in history.read_text()


async def test_chat_without_agents_but_with_a_provider_talks_to_the_services_directly() -> None:
    from fake_anthropic import FakeAnthropic, message, text, tool_use

    class Echo:
        async def Upper(self, req: dict[str, str]) -> dict[str, str]:
            """Upper-case a word."""
            return {"word": req.get("word", "").upper()}

    async with FakeAnthropic() as api, micro.Runtime(registry="local://", store="memory://",
                                                     broker="memory://") as rt:
        api.reply(message(text("Let me check."), tool_use("tu_1", "echo_Echo_Upper", {"word": "micro"})),
                  message(text("It is MICRO.")))
        svc = micro.New("echo", runtime=rt)
        svc.handle(Echo())
        async with svc:
            env = {**os.environ, "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": api.base_url}
            proc = await anyio.run_process([*MICRO, "chat", "-m", "shout micro"], env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines == ["[services] Let me check.", '→ echo_Echo_Upper({"word":"micro"})', '← {"word":"MICRO"}',
                     "It is MICRO."]
    first = api.requests[0].body
    assert [t["name"] for t in first["tools"]] == ["echo_Echo_Upper"]


def test_flow_list_runs_show_and_replay(example: subprocess.Popen[str]) -> None:
    def micro_cli(*args: str, columns: str = "80") -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MICRO, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**os.environ, "COLUMNS": columns})

    flows = {f["name"]: f for f in msgspec.json.decode(micro_cli("flow", "list", "--json").stdout)}
    assert flows["onboard-user"] == {"name": "onboard-user", "trigger": "events.user.created",
                                     "services": ["email", "workspace"], "agent": ""}
    res = micro_cli("call", "user", "User.Create", '{"name": "Zoe", "email": "zoe@example.com"}')
    assert res.returncode == 0, res.stderr
    give_up = time.monotonic() + 60  # the flow runs after the event is published: watch its run records
    while not (runs := [r for r in msgspec.json.decode(micro_cli("flow", "runs", "onboard-user", "--json").stdout)
                        if "Zoe" in msgspec.json.encode(r["event"]).decode() and r["status"] == "completed"]):
        assert time.monotonic() < give_up, "the flow did not record a completed run for the event"
    (run,) = runs
    table = micro_cli("flow", "runs", "onboard-user")  # 80 columns: the run id, status and time whole
    (row,) = [line for line in table.stdout.splitlines() if run["id"] in line]
    assert row.split()[1:5] == ["completed", str(run["attempts"]),
                                *dt.datetime.fromtimestamp(run["started"]).strftime("%m-%d %H:%M:%S").split()]
    res = micro_cli("flow", "runs", "onboard")
    assert res.returncode == 1
    assert res.stderr.strip() == ("error: no flow 'onboard' is registered (flows: close-task, onboard-user); "
                                  "did you mean onboard-user?")
    shown = msgspec.json.decode(micro_cli("flow", "show", run["id"], "--json").stdout)
    assert shown["id"] == run["id"]
    assert [c["name"] for c in shown["tool_calls"]] == [c["name"] for c in run["tool_calls"]]
    replayed = msgspec.json.decode(micro_cli("flow", "replay", run["id"]).stdout)
    assert replayed["replay_of"] == run["id"] and replayed["id"] != run["id"] and replayed["status"] == "completed"
    res = micro_cli("flow", "show", "no-such-run")
    assert res.returncode == 1 and "no flow has a run 'no-such-run'" in res.stderr


def test_ctrl_c_during_a_turn_records_the_run_as_cancelled() -> None:
    app = _start("tests/apps/waiter.py")
    env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(MICRO[0], [*MICRO[1:], "chat"], cwd=str(ROOT), env=env, encoding="utf-8", timeout=30,
                          dimensions=(40, 200))
    try:
        child.expect("Ctrl-D exits")
        child.expect(">")
        child.sendline("wait for me")
        child.expect(r"→ wait_Wait_Forever\(\{\}\)")  # the tool is running: the turn is mid-way
        child.sendintr()
        child.expect(r"\[cancelled\]")
        child.expect(">")  # the REPL goes on
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
        give_up = time.monotonic() + 30  # the agent writes the record as its run unwinds: watch for it
        while not (runs := msgspec.json.decode(subprocess.run(
                [*MICRO, "agent", "runs", "waiter", "--json"], capture_output=True, text=True, timeout=60,
                cwd=ROOT).stdout)):
            assert time.monotonic() < give_up, "the cancelled run was not recorded"
        (run,) = runs
        assert (run["status"], run["error_kind"]) == ("cancelled", "cancelled")
        assert "scope" not in run["error"] and "Task" not in run["error"] and "grpclib" not in run["error"]
        assert [c["name"] for c in run["tool_calls"]] == ["wait_Wait_Forever"]
        table = subprocess.run([*MICRO, "agent", "runs", "waiter"], capture_output=True, text=True, timeout=60,
                               cwd=ROOT)
        assert "  cancelled  1 tool call  " in table.stdout
    finally:
        child.close(force=True)
        app.send_signal(signal.SIGINT)
        app.wait(20)
        assert app.stdout is not None
        app.stdout.close()
    assert child.exitstatus == 0
