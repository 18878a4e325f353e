"""`micro new` as a program: the project it writes runs under `micro run` and passes its own tests.

Each project variant is made once per module and shared by its tests; every
subprocess gets an explicit environment (its own MICRO_HOME), so the programs
started here find each other and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from micro.cli.new import Project, render
from micro.errors import UsageError

MICRO = [sys.executable, "-m", "micro.cli"]
SCRUB = ("MICRO_REGISTRY", "MICRO_BROKER", "MICRO_STORE", "MICRO_PROVIDER", "ANTHROPIC_API_KEY",
         "OPENAI_API_KEY", "PYTEST_ADDOPTS")


def make_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith("PYTEST_")}
    env.update(MICRO_HOME=str(home), MICRO_AI_OFFLINE="1")
    return env


def micro(env: dict[str, str], *args: str, cwd: Path | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MICRO, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


class Running:
    """A `micro run` process that has printed its banner."""

    def __init__(self, proc: subprocess.Popen[str], banner: str) -> None:
        self.proc = proc
        self.banner = banner

    def stop(self) -> str:
        """SIGINT, then its remaining output; it must exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rest, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        assert self.proc.returncode == 0, self.banner + rest
        return rest


def start(env: dict[str, str], *args: str, cwd: Path | None = None) -> Running:
    """`micro ARGS` in the background, returned once it prints "Ctrl-C to stop" (fails if it exits first)."""
    proc = subprocess.Popen([*MICRO, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # blocks until the program prints; ends if it dies
        lines.append(line)
        if "Ctrl-C to stop" in line:
            return Running(proc, "".join(lines))
    proc.wait(30)
    pytest.fail(f"micro {' '.join(args)} exited ({proc.returncode}) before it was ready:\n" + "".join(lines))


def call_json(env: dict[str, str], *args: str) -> Any:
    res = micro(env, "call", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def grpcurl_like(address: str, method: str, body: str) -> Any:
    """``grpcurl -plaintext -d BODY ADDRESS SERVICE/METHOD``: the request type from reflection, JSON in and out."""
    import grpc
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    service, _, name = method.partition("/")
    with grpc.insecure_channel(address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        desc = pool.FindMethodByName(f"{service}.{name}")
        request_cls = message_factory.GetMessageClass(desc.input_type)
        reply_cls = message_factory.GetMessageClass(desc.output_type)
        call = channel.unary_unary(f"/{method}", request_serializer=request_cls.SerializeToString,
                                   response_deserializer=reply_cls.FromString)
        reply = call(json_format.Parse(body, request_cls()), timeout=10)
    return json_format.MessageToDict(reply, preserving_proto_field_name=True)


def run_pytest(env: dict[str, str], project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=120)


# -- the variants -------------------------------------------------------------------------------

VARIANTS = {
    "code": ("notes", []),
    "agent": ("todo-list", ["--agent"]),
    "proto": ("books", ["--proto", "--agent"]),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("new")


@pytest.fixture(scope="module")
def env(workdir: Path) -> dict[str, str]:
    home = workdir / "micro-home"
    home.mkdir()
    return make_env(home)


@pytest.fixture(scope="module", params=list(VARIANTS))
def project(request: pytest.FixtureRequest, workdir: Path, env: dict[str, str]) -> tuple[str, Path]:
    name, flags = VARIANTS[request.param]
    res = micro(env, "new", name, *flags, cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert f"created {name}/" in res.stdout
    return name, workdir / name


def test_the_project_passes_its_own_tests(project: tuple[str, Path], env: dict[str, str]) -> None:
    _, path = project
    res = run_pytest(env, path)
    assert res.returncode == 0, res.stdout + res.stderr
    expected = 5 if (path / "agent.py").exists() else 3
    assert f"{expected} passed" in res.stdout, res.stdout


def test_micro_run_in_the_project_answers_micro_call(project: tuple[str, Path], env: dict[str, str]) -> None:
    name, path = project
    cls = Project(name).cls
    app = start(env, "run", cwd=path)  # PATH defaults to .
    try:
        assert f"service {name} on 127.0.0.1:" in app.banner
        created = call_json(env, name, f"{cls}.Create", '{"title": "Write the docs"}')
        assert created == {"item": {"id": "1", "title": "Write the docs", "done": False}}
        listed = call_json(env, name, f"{cls}.List", "{}")
        assert listed == {"items": [created["item"]], "total": 1}
        # the README's grpcurl line, done as grpcurl does it: reflection, JSON -> protobuf -> JSON
        readme = (path / "README.md").read_text()
        body, method = re.findall(r"grpcurl -plaintext -d '(.+?)' 127\.0\.0\.1:PORT (\S+)", readme)[0]
        port = re.findall(rf"service {name} on 127\.0\.0\.1:(\d+)", app.banner)[0]
        assert grpcurl_like(f"127.0.0.1:{port}", method, body) == {"item": {"id": "2", "title": "Write the docs"}}
        if (path / "agent.py").exists():
            assert f"agent {name}-agent on 127.0.0.1:" in app.banner
            assert "scripted demo model" in app.banner
            rsp = call_json(env, f"{name}-agent", "Agent.Chat", '{"message": "add Buy milk"}')
            assert [c["name"] for c in rsp["tool_calls"]] == [f"{name}_{cls}_Create"]
            assert "Buy milk" in rsp["reply"]
    finally:
        out = app.stop()
    assert "stopped" in out
    assert json.loads(micro(env, "services", "--json").stdout) == []


def test_proto_project_layout(workdir: Path, env: dict[str, str]) -> None:
    res = micro(env, "new", "shelf", "--proto", "--json", cwd=workdir)
    assert res.returncode == 0, res.stderr
    files = json.loads(res.stdout)["files"]
    assert {"proto/shelf.proto", "_proto/shelf/__init__.py", "_proto/message_pool.py", "Makefile"} <= set(files)
    assert "proto:" in (workdir / "shelf" / "Makefile").read_text()
    assert "from _proto.shelf import" in (workdir / "shelf" / "handler.py").read_text()
    assert "agent.py" not in files


# -- refusing -------------------------------------------------------------------------------------


def test_new_refuses_a_non_empty_directory(tmp_path: Path, env: dict[str, str]) -> None:
    tmp_path = tmp_path / "work"  # (the conftest puts a MICRO_HOME into tmp_path itself)
    target = tmp_path / "taken"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("mine")
    res = micro(env, "new", "notes", "--dir", str(target))
    assert res.returncode == 2
    assert "already exists and is not empty" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary directory left behind


def test_new_fills_an_empty_directory(tmp_path: Path, env: dict[str, str]) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    res = micro(env, "new", "notes", "--dir", str(target), "--json")
    assert res.returncode == 0, res.stderr
    assert "app.py" in json.loads(res.stdout)["files"]
    assert (target / "handler.py").is_file()


@pytest.mark.parametrize("name", ["Notes", "a/b"])
def test_new_refuses_a_bad_name(tmp_path: Path, env: dict[str, str], name: str) -> None:
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    res = micro(env, "new", name, cwd=tmp_path)
    assert res.returncode == 2
    assert "invalid project name" in res.stderr
    assert list(tmp_path.iterdir()) == []


# -- rendering (no subprocess) ------------------------------------------------------------------


def test_render_names() -> None:
    p = Project("my-notes", agent=True)
    assert (p.cls, p.package, p.agent_name) == ("MyNotes", "my_notes", "my-notes-agent")
    assert Project("item").cls == "ItemService"  # Item is one of the handler's message types
    for bad in ("9lives", "has space", "", "x" * 41):
        with pytest.raises(UsageError, match="invalid project name"):
            Project(bad)
    files = render(p)
    assert set(files) == {".gitignore", "pyproject.toml", "conftest.py", "app.py", "handler.py", "agent.py",
                          "tests/test_service.py", "tests/test_agent.py", "Makefile", "README.md"}
    assert 'CREATE = "my-notes_MyNotes_Create"' in files["agent.py"]
    assert "micro call my-notes MyNotes.List '{}'" in files["app.py"]
    assert "$" not in files["app.py"] + files["handler.py"]
    assert "\t$(PY) -m pytest -q" in files["Makefile"]


def test_render_refuses_a_keyword_as_proto_package() -> None:
    with pytest.raises(UsageError, match="Python keyword"):
        Project("import", proto=True)

