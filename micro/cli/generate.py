"""``micro run --prompt "…"``: a model writes a service system; it is validated before it ever runs.

The pipeline (:func:`generate_system`):

1. the model gets the prompt, the rules (``micro/templates/generate/system.md.tmpl``)
   and one tool, ``write_files({files: [{path, content}]})``, and answers by calling it;
2. the files are checked without running anything: paths stay inside the output
   directory (no absolute paths, no ``..``, no symlinks, plain names), Python
   files parse (``ast``), ``app.py`` exists; then they are written, beside a
   generated ``tests/test_smoke.py``;
3. in a **separate process** on memory backends (``python -m micro.testing.smoke``,
   with a timeout): ``app.py`` imports, every handler introspects to endpoints with
   JSON schemas and docstrings, every agent manages services the app defines, and
   the smoke test passes (everything starts, every endpoint answers a made-up
   request without an unexpected exception, every agent completes a run on a
   scripted model that uses one of its tools);
4. on failure the problems go back to the model as the ``write_files`` result, for
   at most ``rounds`` repair rounds; then a report, and nothing runs.

Only when all of that passes does the CLI import the app in its own process and
run it as ``micro run DIR`` would.

The model comes from ``--provider`` (or ``$MICRO_PROVIDER``, or ``anthropic`` when
``ANTHROPIC_API_KEY`` is set). For tests and demos without a model, ``--provider
scripted`` plays the turns in the JSON file named by ``MICRO_GENERATE_FIXTURE``
(read here and nowhere else): a list whose items are a reply string or a turn
``{"text": "…", "calls": [["write_files", {"files": [...]}]]}``.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec

from micro.ai import Message, Model, ToolResultBlock, ToolSpec, from_provider, scripted
from micro.ai.scripted import Turn
from micro.cli.new import check_target
from micro.errors import UsageError

__all__ = [
    "FIXTURE_ENV",
    "WRITE_FILES",
    "Attempt",
    "FileSpec",
    "Report",
    "build_model",
    "check_paths",
    "generate_system",
    "resolve_provider",
    "slug",
    "validate",
    "write_files",
]

FIXTURE_ENV = "MICRO_GENERATE_FIXTURE"
SMOKE_TEST = "tests/test_smoke.py"
MAX_FILES = 40
MAX_FILE_BYTES = 200_000
MAX_TOKENS = 16_000
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# top-level names a generated file must not take: they would hide the modules the app runs on
_SHADOWED = frozenset(sys.stdlib_module_names) | {
    "micro", "msgspec", "grpclib", "anyio", "betterproto2", "pytest", "click", "rich", "aiofiles", "h2",
}

WRITE_FILES = ToolSpec(
    name="write_files",
    description=(
        "Write files of the system (paths relative to the project root, e.g. app.py, tasks.py). "
        "Files not sent are kept as they were."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "files": {
                "type": "array",
                "description": "The files to write.",
                "items": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "description": "relative path, e.g. app.py"},
                        "content": {"type": "string", "description": "the whole text of the file"},
                    },
                    "required": ["path", "content"],
                },
            },
        },
        "required": ["files"],
    },
)


class FileSpec(msgspec.Struct, frozen=True):
    """One file the model wrote."""

    path: str
    content: str


class _WriteFiles(msgspec.Struct, frozen=True):
    files: list[FileSpec]


@dataclass
class Attempt:
    """One model answer and what validation found in it."""

    number: int
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What :func:`generate_system` did: ``ok`` when the last attempt passed validation."""

    ok: bool
    out_dir: Path
    attempts: list[Attempt]

    @property
    def problems(self) -> list[str]:
        """The problems of the last attempt (none when ``ok``)."""
        return self.attempts[-1].problems if self.attempts else []

    def summary(self) -> str:
        n = len(self.attempts)
        if self.ok:
            return f"validated after {n} attempt{'s' * (n != 1)}: {', '.join(self.attempts[-1].files)}"
        lines = [f"the generated system did not pass validation after {n} attempt{'s' * (n != 1)} "
                 f"(1 + {n - 1} repair rounds); nothing was started.", "problems in the last attempt:"]
        lines += [f"  - {p}" for p in self.problems]
        if any(a.files for a in self.attempts):
            lines.append(f"the last attempt's files are in {self.out_dir}/ for inspection (remove it to try again)")
        return "\n".join(lines)


def _template(name: str) -> str:
    return (resources.files("micro") / "templates" / "generate" / name).read_text(encoding="utf-8")


# -- static checks and writing (nothing generated runs here) ------------------------------------


def check_paths(files: list[FileSpec]) -> list[str]:
    """Problems with the paths and sizes of ``files``, before anything is written."""
    problems: list[str] = []
    if not files:
        problems.append("write_files got no files")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files: write at most {MAX_FILES}")
    for f in files:
        p = f.path
        parts = p.split("/")  # not PurePosixPath(p).parts, which drops "." and empty parts
        if not p or "\\" in p or "\x00" in p or p.startswith(("/", "~")) or PurePosixPath(p).is_absolute():
            problems.append(f"{p!r}: not a relative path inside the project")
        elif any(part in (".", "..") for part in parts):
            problems.append(f"{p!r}: '.' and '..' are not allowed in paths")
        elif not all(_NAME.match(part) for part in parts) or len(parts) > 4 or len(p) > 200:
            problems.append(f"{p!r}: use plain names (letters, digits, '_', '-', '.'; not starting with '.'), "
                            "at most 4 levels")
        elif parts[0].removesuffix(".py") in _SHADOWED:
            problems.append(f"{p!r} would shadow the module {parts[0].removesuffix('.py')!r}: "
                            "rename it (e.g. add a suffix such as _service)")
        elif p == SMOKE_TEST:
            problems.append(f"{p!r} is written by micro run --prompt: choose another name")
        if len(f.content.encode()) > MAX_FILE_BYTES:
            problems.append(f"{p!r}: larger than {MAX_FILE_BYTES} bytes")
    return problems


def write_files(root: Path, files: list[FileSpec]) -> list[str]:
    """Write ``files`` under ``root``, refusing any that would land outside it; the problems found."""
    problems = check_paths(files)
    if problems:
        return problems
    real_root = root.resolve()
    for f in files:
        parts = f.path.split("/")
        cur = root
        try:
            for part in parts[:-1]:
                cur = cur / part
                if cur.is_symlink() or (cur.exists() and not cur.is_dir()):
                    raise ValueError(f"{cur.relative_to(root)} is a link or a file")
                cur.mkdir(exist_ok=True)
            target = cur / parts[-1]
            if target.is_symlink() or not target.resolve().is_relative_to(real_root):
                raise ValueError("it would be written outside the project")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f.content)
        except (ValueError, OSError) as exc:
            problems.append(f"{f.path!r}: not written: {exc}")
    return problems


def _parse(files: dict[str, str]) -> list[str]:
    problems = []
    for path, text in sorted(files.items()):
        if not path.endswith(".py"):
            continue
        try:
            ast.parse(text, filename=path)
        except SyntaxError as exc:
            problems.append(f"{path}:{exc.lineno}:{exc.offset}: SyntaxError: {exc.msg}")
    if "app.py" not in files:
        problems.append("there is no app.py: write one that defines the services and the agent at top level")
    return problems


async def validate(root: Path, *, timeout: float = 60.0) -> list[str]:
    """Import, introspect and smoke-test the app in ``root`` in a separate process on memory backends."""
    env = dict(os.environ)
    env.update(MICRO_REGISTRY="memory://", MICRO_BROKER="memory://", MICRO_STORE="memory://",
               MICRO_PROVIDER="scripted", MICRO_AI_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "OPENAI_API_KEY", FIXTURE_ENV):
        env.pop(var, None)
    app = os.path.realpath(root)  # noqa: ASYNC240 - no I/O worth a thread
    with tempfile.TemporaryDirectory(prefix="micro-validate-") as tmp:
        report = Path(tmp) / "report.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "micro.testing.smoke", app, "--require-agent",
            "--report", str(report), cwd=tmp, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout):
                output, _ = await proc.communicate()
        except TimeoutError:
            return [f"validation did not finish within {timeout:g}s: does app.py start or block anything "
                    "at import (run(), asyncio.run, a loop)? micro run starts the services itself"]
        finally:
            if proc.returncode is None:  # timed out or cancelled: the whole process group goes
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if report.is_file() and report.stat().st_size:
            problems = msgspec.json.decode(report.read_bytes(), type=list[dict[str, str]])
            if problems or proc.returncode == 0:
                return [f"[{p['stage']}] {p['where']}: {p['message']}" for p in problems]
        tail = "\n".join(output.decode(errors="replace").strip().splitlines()[-15:])
        return [f"the validation process failed (exit code {proc.returncode}): {tail}"]


# -- the conversation -----------------------------------------------------------------------------


async def generate_system(prompt: str, model: Model, out_dir: Path, *, rounds: int = 3, timeout: float = 60.0,
                          on_attempt: Callable[[Attempt], None] | None = None) -> Report:
    """Ask ``model`` for a system described by ``prompt``, write it to ``out_dir`` and validate it.

    Args:
        prompt: what to build, e.g. "task management system".
        model: any :class:`micro.ai.Model` (tests pass ``scripted.turns(...)``).
        out_dir: a directory that does not exist or is empty.
        rounds: repair rounds after the first attempt (so at most ``rounds + 1`` model calls).
        timeout: seconds the validation process may take per attempt.
        on_attempt: called after each attempt is validated (progress output).

    Returns:
        a :class:`Report`; ``ok`` when the last attempt passed. Nothing generated has
        run in this process either way.

    Example::

        model = scripted.turns(scripted.call("write_files", files=[...]))
        report = await generate_system("notes", model, tmp_path / "notes")
        assert report.ok, report.summary()
    """
    created = _prepare(out_dir)
    written: dict[str, str] = {}
    try:
        return await _converse(prompt, model, out_dir, rounds, timeout, on_attempt, written)
    finally:
        if not written:  # the model never got a file written: leave nothing behind
            _unprepare(out_dir, created)


async def _converse(prompt: str, model: Model, out_dir: Path, rounds: int, timeout: float,
                    on_attempt: Callable[[Attempt], None] | None, written: dict[str, str]) -> Report:
    system = _template("system.md.tmpl")
    messages = [Message.user(f"Build this system: {prompt}\n\nCall write_files with all of its files.")]
    attempts: list[Attempt] = []
    for number in range(1, rounds + 2):
        attempt = Attempt(number)
        attempts.append(attempt)
        rsp = await model.generate(messages, tools=[WRITE_FILES], system=system, max_tokens=MAX_TOKENS)
        messages.append(rsp.message)
        uses = rsp.tool_uses
        files: list[FileSpec] = []
        for use in uses:
            if use.name != WRITE_FILES.name:
                attempt.problems.append(f"there is no tool {use.name!r}: call write_files")
                continue
            try:
                files += msgspec.convert(use.input, _WriteFiles).files
            except msgspec.ValidationError as exc:
                attempt.problems.append(f"write_files arguments: {exc}")
        if not uses:
            cut = " (the answer was cut off at max_tokens: write fewer, shorter files)" \
                if rsp.stop_reason == "max_tokens" else ""
            attempt.problems.append(f"answer by calling write_files with the files{cut}")
        if not attempt.problems:
            attempt.problems += write_files(out_dir, files)
        if not attempt.problems:
            written.update((f.path, f.content) for f in files)
            attempt.files = sorted(written)
            attempt.problems += _parse(written)
        if not attempt.problems:
            attempt.problems += await validate(out_dir, timeout=timeout)
        if on_attempt is not None:
            on_attempt(attempt)
        if not attempt.problems:
            return Report(True, out_dir, attempts)
        if number <= rounds:
            messages.append(_feedback(uses, attempt, rounds + 1))
    return Report(False, out_dir, attempts)


def _prepare(out_dir: Path) -> bool:
    """Check and create ``out_dir`` with the smoke test; whether the directory was created."""
    check_target(out_dir)
    created = not out_dir.exists()
    (out_dir / "tests").mkdir(parents=True, exist_ok=True)
    (out_dir / SMOKE_TEST).write_text(_template("test_smoke.py.tmpl"), encoding="utf-8")
    return created


def _unprepare(out_dir: Path, created: bool) -> None:
    (out_dir / SMOKE_TEST).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out_dir / "tests").rmdir()
        if created:
            out_dir.rmdir()


def _feedback(uses: list[Any], attempt: Attempt, total: int) -> Message:
    text = (f"The system does not pass validation yet (attempt {attempt.number} of {total}). Fix these "
            "problems and call write_files again with the corrected files (files you do not send are kept):\n"
            + "\n".join(f"- {p}" for p in attempt.problems))
    if not uses:
        return Message.user(text)
    # every tool_use needs its result; the problems go with the last one
    blocks = [ToolResultBlock(u.id, "not run: see the last result", is_error=True) for u in uses[:-1]]
    blocks.append(ToolResultBlock(uses[-1].id, text, is_error=True))
    return Message.user(*blocks)


# -- choosing the model ---------------------------------------------------------------------------


def resolve_provider(provider: str | None) -> str:
    """``--provider``, else ``$MICRO_PROVIDER``, else ``anthropic`` with ``ANTHROPIC_API_KEY``; else UsageError."""
    chosen = provider or os.environ.get("MICRO_PROVIDER")
    if chosen:
        return chosen
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "anthropic"
    raise UsageError("micro run --prompt needs a model: pass --provider (anthropic, openai, 'openai:llama3.2', …) "
                     "or set ANTHROPIC_API_KEY")


def build_model(provider: str) -> Model:
    """The model for ``provider``; ``scripted`` plays the turns of ``$MICRO_GENERATE_FIXTURE``."""
    if provider.partition(":")[0] != "scripted":
        return from_provider(provider)
    fixture = os.environ.get(FIXTURE_ENV)
    if not fixture:
        raise UsageError(f"--provider scripted plays a fixed script for tests: set {FIXTURE_ENV}=/path/turns.json "
                         "(a JSON list of turns, see docs/scaffolding.md), or use a real provider")
    try:
        turns = msgspec.json.decode(Path(fixture).read_bytes(), type=list[Turn | str])
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"{FIXTURE_ENV}={fixture}: not a JSON list of turns ({exc})") from None
    model = scripted.turns(*turns)
    model.model = f"scripted ({Path(fixture).name})"
    return model


def slug(prompt: str) -> str:
    """A directory name from a prompt: "Task management system!" -> "task-management-system"."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "generated"


# -- the command ----------------------------------------------------------------------------------


async def generate_for_cli(prompt: str, provider: str | None, out_dir: Path | None, rounds: int) -> Path:
    """What ``micro run --prompt`` does before running: the validated directory, or exit 1 with a report."""
    from micro.cli.main import err, fail, out

    name = resolve_provider(provider)
    dest = out_dir if out_dir is not None else Path(slug(prompt))
    check_target(dest)
    model = build_model(name)

    def progress(a: Attempt) -> None:
        head = f"attempt {a.number}: {len(a.files)} files" if a.files else f"attempt {a.number}"
        if not a.problems:
            out.print(f"[green]✓[/green] {head}: valid (imports, endpoints with schemas, smoke test)")
            return
        out.print(f"[red]✗[/red] {head}: {len(a.problems)} problem{'s' * (len(a.problems) != 1)}")
        for p in a.problems:
            out.print(f"    {p}", markup=False, style="dim")

    out.print(f"generating [bold]{prompt}[/bold] with {model.model} into {dest}/", markup=True)
    async with model:
        report = await generate_system(prompt, model, dest, rounds=rounds, on_attempt=progress)
    if not report.ok:
        err.print(report.summary(), markup=False)
        fail(f"micro run --prompt: no valid system after {len(report.attempts)} attempts; nothing is running")
    # the agents of the generated app build their model from $MICRO_PROVIDER: the same provider
    os.environ["MICRO_PROVIDER"] = name
    out.print(f"running it as `micro run {dest}` would", markup=False)
    return dest
