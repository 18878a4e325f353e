"""`micro run --prompt`: generated code is validated in another process before anything runs.

Scripted models stand in for the real one: through the pipeline function with a
`micro.ai.Model`, and end to end through the CLI with `--provider scripted` and
`MICRO_GENERATE_FIXTURE` (a JSON list of turns).
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import msgspec
import pytest
from test_new import make_env, micro, start

from micro.ai import ToolResultBlock, scripted
from micro.cli.generate import (
    FIXTURE_ENV,
    FileSpec,
    build_model,
    check_paths,
    generate_system,
    resolve_provider,
    slug,
    write_files,
)
from micro.errors import AgentError, UsageError

APP = textwrap.dedent('''
    """Notes, and an agent that keeps them."""

    import micro
    from notes_service import Notes

    notes = micro.New("notes")
    notes.handle(Notes())

    keeper = micro.NewAgent("notes-mgr", services=["notes"], prompt="You keep notes.")
''')

SERVICE = textwrap.dedent('''
    """Notes kept in memory."""

    import itertools

    import msgspec

    from micro.errors import BadRequest, NotFound


    class Note(msgspec.Struct):
        id: str
        text: str


    class AddRequest(msgspec.Struct):
        text: str


    class GetRequest(msgspec.Struct):
        id: str


    class ListRequest(msgspec.Struct):
        query: str = ""


    class NoteResponse(msgspec.Struct):
        note: Note


    class ListResponse(msgspec.Struct):
        notes: list[Note]
        total: int


    class Notes:
        """Notes with a text."""

        def __init__(self) -> None:
            self.notes: dict[str, Note] = {}
            self._ids = itertools.count(1)

        async def Add(self, req: AddRequest) -> NoteResponse:
            """Add a note."""
            if not req.text.strip():
                raise BadRequest("text: must not be empty")
            note = Note(str(next(self._ids)), req.text)
            self.notes[note.id] = note
            return NoteResponse(note)

        async def Get(self, req: GetRequest) -> NoteResponse:
            """Get a note by id."""
            if req.id not in self.notes:
                raise NotFound(f"no note {req.id!r}")
            return NoteResponse(self.notes[req.id])

        async def List(self, req: ListRequest) -> ListResponse:
            """List the notes whose text contains query."""
            found = [n for n in self.notes.values() if req.query in n.text]
            return ListResponse(found, len(found))
''')

CRASHING = SERVICE.replace('''        if req.id not in self.notes:
            raise NotFound(f"no note {req.id!r}")
''', "")
assert CRASHING != SERVICE


def write(*files: tuple[str, str]) -> scripted.Turn:
    return scripted.call("write_files", files=[{"path": p, "content": c} for p, c in files])


VALID = write(("app.py", APP), ("notes_service.py", SERVICE), ("README.md", "micro call notes Notes.List '{}'\n"))


def fixture_file(tmp_path: Path, *turns: scripted.Turn | str) -> Path:
    path = tmp_path / "turns.json"
    path.write_bytes(msgspec.json.encode(list(turns)))
    return path


@pytest.fixture
def env(tmp_path: Path, micro_home: Path) -> dict[str, str]:
    return make_env(micro_home)


# -- end to end through the CLI --------------------------------------------------------------------


def test_a_valid_system_is_validated_then_runs_and_answers_micro_call(tmp_path: Path,
                                                                      env: dict[str, str]) -> None:
    env[FIXTURE_ENV] = str(fixture_file(tmp_path, VALID))
    out = tmp_path / "notes-system"
    app = start(env, "run", "--prompt", "a notes app", "--provider", "scripted", "--out", str(out), cwd=tmp_path)
    try:
        assert "✓ attempt 1: 3 files: valid" in app.banner
        assert "service notes on 127.0.0.1:" in app.banner
        assert "agent notes-mgr on" in app.banner
        res = micro(env, "call", "notes", "Notes.Add", '{"text": "buy milk"}')
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == {"note": {"id": "1", "text": "buy milk"}}
        # the generated agent runs on the provider the system was generated with
        res = micro(env, "call", "notes-mgr", "Agent.Chat", '{"message": "hello"}')
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["reply"] == "[scripted model: no script, echoing] hello"
    finally:
        app.stop()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "app.py", "notes_service.py", "tests"]
    assert (out / "tests" / "test_smoke.py").is_file()
    assert json.loads(micro(env, "services", "--json").stdout) == []


def test_a_system_never_fixed_ends_with_a_report_and_nothing_running(tmp_path: Path,
                                                                      env: dict[str, str]) -> None:
    broken_syntax = write(("app.py", APP), ("notes_service.py", SERVICE.replace("class Notes:", "class Notes")))
    crashing = write(("notes_service.py", CRASHING))
    env[FIXTURE_ENV] = str(fixture_file(tmp_path, broken_syntax, crashing, VALID))  # VALID is never asked for
    out = tmp_path / "never"
    res = micro(env, "run", "--prompt", "notes", "--provider", "scripted", "--out", str(out), "--rounds", "1",
                cwd=tmp_path, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "✗ attempt 1: 2 files: 1 problem" in res.stdout
    assert "notes_service.py:37:12: SyntaxError: expected ':'" in res.stdout
    assert "✗ attempt 2: 2 files: 1 problem" in res.stdout
    assert "did not pass validation after 2 attempts (1 + 1 repair rounds); nothing was started" in res.stderr
    assert "[call] notes Notes.Get: failed on the request {\"id\":\"smoke\"}: KeyError: 'smoke'" in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "error: micro run --prompt: no valid system after 2 attempts; nothing is running")
    assert "Ctrl-C to stop" not in res.stdout
    assert json.loads(micro(env, "services", "--json").stdout) == []
    assert (out / "notes_service.py").read_text() == CRASHING  # kept for inspection


def test_no_provider_and_no_key_is_a_clear_error(tmp_path: Path, env: dict[str, str]) -> None:
    res = micro(env, "run", "--prompt", "a notes app", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: micro run --prompt needs a model: pass --provider (anthropic, openai, "
                                  "'openai:llama3.2', …) or set ANTHROPIC_API_KEY")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["micro-home"]  # nothing written


# -- the pipeline with a Model --------------------------------------------------------------------


async def test_a_broken_system_is_repaired_on_the_second_round(tmp_path: Path) -> None:
    model = scripted.turns(
        write(("app.py", APP), ("notes_service.py", CRASHING)),
        write(("notes_service.py", SERVICE)),  # only the fixed file: app.py is kept
    )
    seen: list[int] = []
    report = await generate_system("notes", model, tmp_path / "out", on_attempt=lambda a: seen.append(a.number))
    assert report.ok, report.summary()
    assert seen == [1, 2]
    assert [a.problems == [] for a in report.attempts] == [False, True]
    assert report.attempts[1].files == ["app.py", "notes_service.py"]

    # the model received the error text as the result of its write_files call
    assert len(model.calls) == 2
    (result,) = model.calls[1].messages[-1].content
    assert isinstance(result, ToolResultBlock) and result.is_error
    assert result.tool_use_id == model.calls[1].messages[-2].content[0].id  # type: ignore[union-attr]
    assert "attempt 1 of 4" in result.content
    assert "[call] notes Notes.Get: failed on the request {\"id\":\"smoke\"}: KeyError: 'smoke'" in result.content
    assert "raise micro.errors.BadRequest or NotFound" in result.content
    assert model.calls[0].tool_names == ["write_files"]
    assert "write_files" in (model.calls[0].system or "")
    assert (tmp_path / "out" / "notes_service.py").read_text() == SERVICE


async def test_an_import_error_and_a_text_answer_go_back_to_the_model(tmp_path: Path) -> None:
    model = scripted.turns(
        "Here is my plan: ...",
        write(("app.py", APP.replace("from notes_service import Notes", "from nowhere import Notes"))),
    )
    report = await generate_system("notes", model, tmp_path / "out", rounds=1)
    assert not report.ok
    assert report.attempts[0].problems == ["answer by calling write_files with the files"]
    (text,) = model.calls[1].messages[-1].content  # no tool call to answer: a user message
    assert "answer by calling write_files" in getattr(text, "text", "")
    (problem,) = report.problems
    assert problem.startswith("[import]") and "ModuleNotFoundError: No module named 'nowhere'" in problem
    assert "app.py:5" in problem
    assert "nothing was started" in report.summary()


async def test_nothing_is_left_behind_when_the_model_never_wrote_a_file(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="no more turns"):
        await generate_system("notes", scripted.turns(), tmp_path / "gone")  # the model call fails
    assert not (tmp_path / "gone").exists()
    report = await generate_system("notes", scripted.turns("no", "still no"), tmp_path / "gone", rounds=1)
    assert not report.ok and len(report.attempts) == 2
    assert "for inspection" not in report.summary()
    assert not (tmp_path / "gone").exists()


async def test_the_output_directory_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.py").write_text("x = 1\n")
    with pytest.raises(UsageError, match="not empty"):
        await generate_system("notes", scripted.turns(VALID), tmp_path / "taken")


# -- static checks (nothing runs) -----------------------------------------------------------------


@pytest.mark.parametrize(("path", "needle"), [
    ("/etc/passwd", "not a relative path"),
    ("~/x.py", "not a relative path"),
    ("a\\b.py", "not a relative path"),
    ("../escape.py", "'..'"),
    ("pkg/../../escape.py", "'..'"),
    ("./app.py", "'.'"),
    (".hidden.py", "plain names"),
    ("a b.py", "plain names"),
    ("a/b/c/d/e.py", "at most 4 levels"),
    ("email.py", "shadow the module 'email'"),
    ("micro/__init__.py", "shadow the module 'micro'"),
    ("tests/test_smoke.py", "is written by micro run --prompt"),
    ("", "not a relative path"),
])
def test_paths_outside_or_odd_are_refused(tmp_path: Path, path: str, needle: str) -> None:
    tmp_path = tmp_path / "out"  # (the conftest puts a MICRO_HOME into tmp_path itself)
    tmp_path.mkdir()
    problems = write_files(tmp_path, [FileSpec(path, "x = 1\n"), FileSpec("app.py", "")])
    assert len(problems) == 1 and needle in problems[0], problems
    assert list(tmp_path.iterdir()) == []  # nothing of the batch is written


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    (root / "file.py").symlink_to(outside / "target.py")
    problems = write_files(root, [FileSpec("link/x.py", "x = 1\n"), FileSpec("file.py", "y = 2\n"),
                                  FileSpec("ok.py", "z = 3\n")])
    assert len(problems) == 2
    assert "'link/x.py': not written: link is a link or a file" in problems
    assert "'file.py': not written: it would be written outside the project" in problems
    assert list(outside.iterdir()) == []
    assert (root / "ok.py").read_text() == "z = 3\n"


def test_too_many_and_too_large_files() -> None:
    many = [FileSpec(f"m{i}.py", "") for i in range(41)]
    assert check_paths(many) == ["41 files: write at most 40"]
    assert check_paths([FileSpec("big.py", "#" * 200_001)]) == ["'big.py': larger than 200000 bytes"]
    assert check_paths([]) == ["write_files got no files"]


def test_provider_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_provider("openai:llama3.2") == "openai:llama3.2"
    with pytest.raises(UsageError, match="pass --provider"):
        resolve_provider(None)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    assert resolve_provider(None) == "anthropic"
    monkeypatch.setenv("MICRO_PROVIDER", "openai")
    assert resolve_provider(None) == "openai"

    monkeypatch.delenv(FIXTURE_ENV, raising=False)
    with pytest.raises(UsageError, match=FIXTURE_ENV):
        build_model("scripted")
    monkeypatch.setenv(FIXTURE_ENV, str(fixture_file(tmp_path, VALID, "done")))
    model = build_model("scripted")
    assert model.model == "scripted (turns.json)"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    monkeypatch.setenv(FIXTURE_ENV, str(bad))
    with pytest.raises(UsageError, match="not a JSON list of turns"):
        build_model("scripted")


def test_slug() -> None:
    assert slug("Task management system!") == "task-management-system"
    assert slug("???") == "generated"
    assert len(slug("word " * 40)) <= 40


def test_run_takes_a_path_or_a_prompt_not_both(tmp_path: Path, env: dict[str, str]) -> None:
    res = micro(env, "run", str(tmp_path), "--prompt", "x", cwd=tmp_path)
    assert res.returncode == 2 and "give PATH or --prompt, not both" in res.stderr
    assert os.listdir(tmp_path) == ["micro-home"]
