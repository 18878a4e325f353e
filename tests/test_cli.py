"""The micro command as a program: `micro run` in one process, `micro call` and friends in others."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._servers import free_port

ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]


def micro(*args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MICRO, *args], capture_output=True, text=True, input=input,
                          timeout=timeout, env=os.environ.copy(), cwd=ROOT)


class Running:
    def __init__(self, proc: subprocess.Popen[str], banner: list[str]) -> None:
        self.proc = proc
        self.banner = banner


def start_app(path: str, *options: str, env: dict[str, str] | None = None) -> Running:
    proc = subprocess.Popen([*MICRO, "run", path, *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env or os.environ.copy(), cwd=ROOT)
    banner: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # blocks until the app prints; ends if it dies
        banner.append(line)
        if "Ctrl-C to stop" in line:
            return Running(proc, banner)
    proc.wait(10)
    proc.stdout.close()
    pytest.fail("micro run exited before it was ready:\n" + "".join(banner))


@pytest.fixture
def tasks_app() -> Iterator[Running]:
    app = start_app("examples/tasks")
    yield app
    stop_app(app)


def stop_app(app: Running) -> None:
    assert app.proc.stdout is not None
    if app.proc.poll() is None:
        app.proc.send_signal(signal.SIGINT)
        try:
            app.proc.wait(20)
        except subprocess.TimeoutExpired:
            app.proc.kill()
            app.proc.wait()
    app.proc.stdout.close()


def test_run_prints_services_and_how_to_call(tasks_app: Running) -> None:
    text = "".join(tasks_app.banner)
    assert "service task on 127.0.0.1:" in text
    assert "service project on 127.0.0.1:" in text
    assert "micro call task Task.ListOverdue" in text
    flows = {line.split()[2]: line.split(" (", 1)[1] for line in tasks_app.banner if line.startswith("● flow ")}
    assert flows == {  # what each flow has, and nothing it lacks (a stepped flow has no model: no "model: ")
        "onboard-user": "on events.user.created over email,workspace; model: scripted demo model (set "
                        "ANTHROPIC_API_KEY to use Claude))\n",
        "close-task": "on events.task.close_requested; steps: lead → approved → closed → notified)\n",
    }


@pytest.mark.parametrize(("meta", "summary"), [
    ({"trigger": "t", "services": "a,b", "model": "m"}, "on t over a,b; model: m"),
    ({"trigger": "t", "agent": "x", "model": ""}, "on t; agent x"),
    ({"schedule": "0 2 * * *", "trigger": "", "steps": "a,b", "model": "m"},
     "schedule 0 2 * * *; steps: a → b; model: m"),
    ({"every": "900", "trigger": "t", "steps": "a", "model": ""}, "on t and every 900s; steps: a"),
])
def test_the_banner_says_what_a_flow_has(meta: dict[str, str], summary: str) -> None:
    from micro.cli.run import flow_summary

    assert flow_summary(meta) == summary


def test_call_list_overdue_from_another_process(tasks_app: Running) -> None:
    res = micro("call", "task", "Task.ListOverdue", '{"user_id": "alice"}')
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["total"] == 3
    assert [r["title"] for r in body["records"]] == [
        "Write quarterly report", "Review PR #42", "Update deployment docs",
    ]


def test_call_reads_json_from_stdin(tasks_app: Running) -> None:
    res = micro("call", "task", "Task.ListOverdue", "-", input='{"user_id": "bob"}')
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["total"] == 1


def test_cross_service_call_inside_the_app(tasks_app: Running) -> None:
    res = micro("call", "project", "Project.Get", '{"id": "p1"}')
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["record"]["name"] == "Website"
    assert {t["id"] for t in body["tasks"]} == {"t1", "t2", "t6"}


def test_services_and_describe_json(tasks_app: Running) -> None:
    res = micro("services", "--json")
    assert res.returncode == 0, res.stderr
    records = json.loads(res.stdout)
    assert [r["name"] for r in records] == ["close-task", "comms-mgr", "email", "milestone", "notification",
                                            "onboard-user", "project", "project-mgr", "task", "task-mgr", "user",
                                            "workspace"]
    assert {r["name"]: r["metadata"].get("type") for r in records}["task-mgr"] == "agent"
    assert all(r["nodes"][0]["address"].startswith("127.0.0.1:") for r in records)

    res = micro("describe", "task", "--json")
    assert res.returncode == 0, res.stderr
    (task,) = json.loads(res.stdout)
    ep = next(e for e in task["endpoints"] if e["name"] == "Task.ListOverdue")
    assert ep["path"] == "/task.Task/ListOverdue"
    assert "past their due date" in ep["description"]
    assert ep["request"]["required"] == ["user_id"]
    assert ep["request"]["properties"]["user_id"] == {"type": "string"}

    (node,) = task["nodes"]
    assert node["metadata"]["native"].startswith("127.0.0.1:") and node["metadata"]["native"] != node["address"]
    res = micro("describe", "task")
    assert res.returncode == 0, res.stderr
    assert f"(gRPC {node['address']}, native {node['metadata']['native']})" in res.stdout
    assert f"native wire on this host: {node['metadata']['native_unix']}" in res.stdout

    res = micro("describe", "task", "--proto")
    assert res.returncode == 0, res.stderr
    assert "rpc ListOverdue(ListOverdueRequest) returns (ListOverdueResponse);" in res.stdout
    assert "repeated TaskRecord records = 1;" in res.stdout


def test_grpcio_calls_a_code_first_endpoint_with_stubs_from_describe_proto(tasks_app: Running, tmp_path: Path) -> None:
    import grpc

    (task,) = json.loads(micro("describe", "task", "--json").stdout)
    (tmp_path / "task.proto").write_text(micro("describe", "task", "--proto").stdout)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", str(tmp_path / "task.proto")], check=True, capture_output=True)
    sys.path.insert(0, str(tmp_path))
    try:
        import task_pb2
        import task_pb2_grpc
    finally:
        sys.path.remove(str(tmp_path))
    with grpc.insecure_channel(task["nodes"][0]["address"]) as channel:
        rsp = task_pb2_grpc.TaskStub(channel).ListOverdue(task_pb2.ListOverdueRequest(user_id="alice"), timeout=10)
        assert rsp.total == 3
        assert [r.title for r in rsp.records] == ["Write quarterly report", "Review PR #42", "Update deployment docs"]
        raw = channel.unary_unary("/task.Task/ListOverdue")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\x03\xff\xfe\xfd", timeout=10)  # user_id is not UTF-8
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "task Task.ListOverdue: malformed protobuf: a string that is not UTF-8 - at `$.user_id`" \
            in err.value.details()


def test_micro_run_metrics_address_serves_metrics_and_health() -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    app = start_app("examples/tasks", "--metrics-address", "127.0.0.1:0")
    try:
        found = re.search(r"metrics on (http://\S+)/metrics", "".join(app.banner))
        assert found, app.banner
        url = found[1]
        assert httpx.get(f"{url}/health/live").text == "live\n"
        assert httpx.get(f"{url}/health/ready").status_code == 200

        def served() -> float:
            text = httpx.get(f"{url}/metrics").text
            wanted = {"service": "task", "endpoint": "Task.ListOverdue", "code": "OK"}  # either wire
            return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "micro_rpc_server_calls_total" and s.labels["path"] != "in-process"
                       and {k: v for k, v in s.labels.items() if k != "path"} == wanted)

        before = served()
        for _ in range(3):
            assert micro("call", "task", "Task.ListOverdue", '{"user_id": "alice"}').returncode == 0
        assert served() == before + 3
    finally:
        stop_app(app)


def test_describe_proto_of_every_example_service_compiles_with_protoc(tasks_app: Running, tmp_path: Path) -> None:
    names = [r["name"] for r in json.loads(micro("services", "--json").stdout)]
    assert len(names) == 12
    agents = {r["name"] for r in json.loads(micro("services", "--json").stdout) if r["metadata"].get("type") == "agent"}
    assert agents
    for name in names:
        out = tmp_path / name
        res = micro("describe", name, "--proto", "--out", str(out))
        assert res.returncode == 0, res.stderr
        files = [Path(line) for line in res.stdout.split()]
        assert files and all(f.is_file() and f.is_relative_to(out) for f in files), res.stdout
        protoc = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}", *map(str, files)],
            capture_output=True, text=True)
        assert protoc.returncode == 0, f"{name}: {protoc.stderr}\n{res.stdout}"
        assert len(list(out.rglob("*_pb2.py"))) == len(files), name
        if name in agents:  # its proto-first Agent service, as rebuilt from the betterproto2 classes: not a sketch
            text = "\n".join(f.read_text() for f in files)
            assert "service Agent {" in text and "rpc Chat(" in text, text


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (
            ("task", "Task.ListOverdue", '{"user_id": 7}'),
            1,
            "BadRequest: task Task.ListOverdue: Expected `str`, got `int` - at `$.user_id`",
        ),
        (("task", "Task.Nope", "{}"), 1, "EndpointNotFound: service 'task' has no endpoint 'Task.Nope'"),
        (("task", "Task.Lst", "{}"), 1, "(it has: Task.Create, Task.Delete, Task.List, Task.ListOverdue, Task.Update); "
                                        "did you mean Task.List?"),
        (("nope", "X.Y", "{}"), 1, "error: no service 'nope' is registered (services: close-task, comms-mgr, email, "
                                   "milestone, notification, onboard-user, project, project-mgr, task, task-mgr, user, "
                                   "workspace) (`micro services` lists them)"),
        (("tsk", "Task.List", "{}"), 1, "error: no service 'tsk' is registered (services: close-task, comms-mgr, "),
        (("tsk", "Task.List", "{}"), 1, "workspace); did you mean task?"),
        (("task", "Task.List", "{oops"), 2, "the request is not valid JSON"),
    ],
)
def test_call_errors_are_one_line(tasks_app: Running, args: tuple[str, ...], code: int, needle: str) -> None:
    res = micro("call", *args)
    assert res.returncode == code
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert res.stdout == ""


def test_sigint_deregisters(tasks_app: Running) -> None:
    tasks_app.proc.send_signal(signal.SIGINT)
    out, _ = tasks_app.proc.communicate(timeout=20)
    assert tasks_app.proc.returncode == 0, out
    assert "stopped" in out
    res = micro("services", "--json")
    assert json.loads(res.stdout) == []


def test_reload_refuses_a_metrics_address(tmp_path: Path) -> None:
    res = micro("run", "--reload", "--metrics-address", "127.0.0.1:0", "examples/tasks")
    assert res.returncode == 2
    assert res.stderr.startswith("error: --metrics-address does not go with --reload: the old and the new version "
                                 "would both bind it")


def test_run_refuses_a_path_without_services(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("x = 1\n")
    res = micro("run", str(tmp_path))
    assert res.returncode == 1
    assert "defines no services" in res.stderr
    res = micro("run", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert "does not exist" in res.stderr


def test_describe_an_unknown_service_suggests_one(tasks_app: Running) -> None:
    res = micro("describe", "taks")
    assert res.returncode == 1
    assert res.stderr.startswith("error: no service 'taks' is registered (services: close-task, comms-mgr, email")
    assert res.stderr.endswith("; did you mean task?\n")
    res = micro("bench", "taks", "Task.List", '{"user_id": "bob"}')
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: no service 'taks' is registered (services: ")
    assert res.stderr.endswith("; did you mean task?\n")


async def test_not_found_never_names_micros_internal_records(capsys: pytest.CaptureFixture[str]) -> None:
    import micro
    from micro.cli.main import missing

    async def handle(message: object) -> None:
        pass  # never delivered: the subscription only makes the local broker register micro-broker

    async with micro.Runtime(registry="memory://", broker="local://", store="memory://") as rt:
        await rt.broker.subscribe("jobs", handle)
        assert [r.name for r in await rt.registry.list()] == ["micro-broker"]
        with pytest.raises(SystemExit):
            await missing(rt, "micro-brokr")
    assert capsys.readouterr().err == ("error: no service 'micro-brokr' is registered (services: none) "
                                       "(`micro services` lists them)\n")


@pytest.mark.parametrize(("args", "message"), [
    (("nosuch",), "error: No such command 'nosuch'."),
    (("call",), "error: Missing argument 'SERVICE'."),
    (("chat", "--nope"), "error: No such option '--nope'. Did you mean '--model'?"),
])
def test_bad_arguments_read_like_every_other_error(args: tuple[str, ...], message: str) -> None:
    res = micro(*args)
    assert res.returncode == 2
    assert res.stderr.splitlines()[0].startswith("Usage: micro")  # how to call it, then the error
    assert res.stderr.splitlines()[-1] == message
    assert "Error:" not in res.stderr  # one spelling: error:



def test_an_error_in_the_apps_code_shows_the_apps_frames(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import helper\n")
    (tmp_path / "helper.py").write_text("def f():\n    return undefined_name\n\n\nf()\n")
    res = micro("run", str(tmp_path))
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"error: {tmp_path / 'app.py'}: importing: NameError: name 'undefined_name' is not defined",
        f'  File "{tmp_path / "app.py"}", line 1, in <module>', "    import helper",
        f'  File "{tmp_path / "helper.py"}", line 5, in <module>', "    f()",
        f'  File "{tmp_path / "helper.py"}", line 2, in f', "    return undefined_name", "           ^^^^^^^^^^^^^^",
        "(micro run --traceback shows every frame)",
    ]  # not click's, asyncio's or importlib's
    full = micro("run", str(tmp_path), "--traceback")
    assert full.returncode == 1
    assert "Traceback (most recent call last)" in full.stderr and "click" in full.stderr and "importlib" in full.stderr
    (tmp_path / "helper.py").write_text("def f(:\n    pass\n")
    res = micro("run", str(tmp_path))
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == (f"error: {tmp_path / 'app.py'}: importing: SyntaxError: invalid syntax "
                                          f"(helper.py, line 1)")
    assert res.stderr.splitlines()[3:6] == [f'  File "{tmp_path / "helper.py"}", line 1', "    def f(:",
                                            "          ^"]


ECHO_APP = '''import micro


class Echo:
    async def Say(self, req: dict[str, str]) -> dict[str, str]:
        return req


svc = micro.New("echo")
svc.handle(Echo())
'''


def _run_with_blocked_module(tmp_path: Path, module: str, *options: str) -> Running:
    """`micro run` of a one-service app in a Python where importing ``module`` fails (None in sys.modules:
    ``import`` raises, ``importlib.util.find_spec`` answers None), as when micro[gateway] is not installed."""
    (tmp_path / "app.py").write_text(ECHO_APP)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return start_app(str(tmp_path / "app.py"), *options, env=env)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def test_run_without_the_dashboards_modules_warns_once_and_binds_nothing(tmp_path: Path) -> None:
    port = free_port()
    app = _run_with_blocked_module(tmp_path, "jinja2", "--http-address", f"127.0.0.1:{port}")
    try:
        text = "".join(app.banner)
        assert "warning: no dashboard: pip install 'micro[gateway]' (missing: jinja2)\n" in text
        assert "dashboard: http" not in text and "service echo on 127.0.0.1:" in text  # the services go on
        assert _refused(port)  # nothing listens: no connection waits in a backlog nobody serves
    finally:
        stop_app(app)


def test_run_reports_a_failing_dashboard_at_once_and_lets_go_of_its_port(tmp_path: Path) -> None:
    app = _run_with_blocked_module(tmp_path, "micro.dashboard.pages", "--http-address", "127.0.0.1:0")
    try:
        url = next(line.split()[1] for line in app.banner if line.startswith("dashboard: "))
        assert app.proc.stdout is not None
        for line in app.proc.stdout:  # while it runs, not when it stops (before the fix: only at Ctrl-C)
            app.banner.append(line)
            if "failed" in line:
                break
        assert line == (f"warning: the dashboard on {url} failed: ModuleNotFoundError: import of "
                        "micro.dashboard.pages halted; None in sys.modules; the services go on without it\n")
        assert _refused(int(url.rpartition(":")[2]))  # the socket is closed: no connection hangs
        assert app.proc.poll() is None
    finally:
        stop_app(app)


def test_micro_dashboard_off_loopback_without_allow_host_fails_at_once_naming_it() -> None:
    # its pages would be served but every form refused: an error before anything starts, not a dashboard
    # that does nothing
    done = micro("dashboard", "--address", "0.0.0.0:0", timeout=30)
    assert done.returncode == 2, done
    assert done.stderr.startswith("error: --address 0.0.0.0:0 is not a loopback address"), done.stderr
    assert "--allow-host dashboard.example.com" in done.stderr


def test_micro_run_off_loopback_without_allow_host_serves_the_json_api_for_any_host_and_no_dashboard() -> None:
    # an API-only `micro run` in a container (MICRO_HTTP_ADDRESS=0.0.0.0:8080) served the JSON API for any
    # Host before the dashboard existed; the dashboard's fail-fast made it exit 2
    import httpx

    app = start_app("examples/tasks", env={**os.environ, "MICRO_HTTP_ADDRESS": "0.0.0.0:0"})
    try:
        (note,) = [line for line in app.banner if line.startswith("note: no dashboard")]
        assert note == ("note: no dashboard on 0.0.0.0:0 (not a loopback address): serving the JSON API only; pass "
                        "--allow-host NAME (the names browsers reach it by, repeatable) to serve the dashboard there "
                        "too\n")
        url = next(line.split()[1] for line in app.banner if line.startswith("api: "))
        port = int(url.rpartition(":")[2])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Host": "tasks.internal:8080"}) as http:
            listed = http.get("/api/services")
            assert listed.status_code == 200 and "task" in {s["name"] for s in listed.json()}
            assert http.get("/", headers={"Accept": "text/html"}).status_code == 404  # no dashboard mounted
    finally:
        stop_app(app)
