"""The README is true: its tour runs as printed (as a program, and under `micro run`), and every
transcript in it is what a user sees following it top to bottom against the example system."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]
README = (ROOT / "README.md").read_text()


def tour() -> str:
    section = README.split("## A tour", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README.md's tour has no python block"
    return match.group(1)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "MICRO_"))}
    env["MICRO_HOME"] = str(tmp_path / "home")  # its own machine-wide registry and file store
    env["MICRO_AI_OFFLINE"] = "1"
    return env


def test_the_tour_runs_as_printed(tmp_path: Path) -> None:
    script = tmp_path / "tour.py"
    script.write_text(tour())
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    call, reply = res.stdout.splitlines()
    assert "'total': 1" in call and "Write quarterly report" in call  # the endpoint answered over the call path
    assert "What tasks are overdue for Alice?" in reply and "scripted" in reply  # the key-free model, labelled


def _serve(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([*MICRO, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd, env=env)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Ctrl-C to stop" in line:
            return proc, seen
    proc.wait(20)
    proc.stdout.close()
    pytest.fail("micro run exited early:\n" + "".join(seen))


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def test_the_tour_runs_under_micro_run_as_its_comment_says(tmp_path: Path) -> None:
    (tmp_path / "tour.py").write_text(tour())
    env = _env(tmp_path)
    proc, banner = _serve(["tour.py"], tmp_path, env)
    try:
        assert any(line.startswith("● service task on ") for line in banner), banner
        assert any(line.startswith("● agent task-mgr on ") for line in banner), banner
        res = subprocess.run([*MICRO, "call", "task", "Task.ListOverdue", '{"user_id": "alice"}'],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        assert msgspec.json.decode(res.stdout)["total"] == 1
    finally:
        _stop(proc)


def test_an_app_that_calls_asyncio_run_on_import_is_told_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import asyncio\n\nasync def main():\n    pass\n\nasyncio.run(main())\n")
    res = subprocess.run([*MICRO, "run", "app.py"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env=_env(tmp_path))
    assert res.returncode == 1
    first, *frames, last = res.stderr.splitlines()
    assert first.startswith("error: app.py: importing: RuntimeError: asyncio.run() cannot be called from a running "
                            "event loop (micro run imports the file and serves what it defines at top level on its "
                            "own loop: put the asyncio.run(...) under `if __name__ == \"__main__\":`)")
    assert frames == [f'  File "{tmp_path / "app.py"}", line 6, in <module>', "    asyncio.run(main())"]
    assert last == "(micro run --traceback shows every frame)"


# -- the transcripts -------------------------------------------------------------------------------

SKIP = ("micro run", "micro new", "micro api", "micro mcp", "micro subscribe")  # long-running, or not this system


def transcripts() -> Iterator[tuple[str, list[str]]]:
    """Every `$ micro …` command of README's console blocks, top to bottom, with the output printed under it.

    A block that starts or makes something else (micro run, micro new, …) is not part of the tour of the
    example system; a command with a placeholder in capitals (RUN_ID) is not run.
    """
    for block in re.findall(r"```console\n(.*?)```", README, re.S):
        lines = block.splitlines()
        commands = [line[2:] for line in lines if line.startswith("$ ")]
        if any(not c.startswith("micro ") or c.startswith(SKIP) for c in commands):
            continue
        current: tuple[str, list[str]] | None = None
        for line in lines:
            if line.startswith("$ "):
                if current is not None:
                    yield current
                current = (line[2:], [])
            elif current is not None:
                current[1].append(line)
        if current is not None:
            yield current


_VARYING = [  # what changes from run to run: ids, dates, times (and token counts, which count the dates)
    (re.compile(r"\b\d+/\d+ tokens\b"), "<n>/<n> tokens"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<id>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}\b"), "<date>"),
    (re.compile(r"\b\d{2}:\d{2}:\d{2}\b"), "<time>"),
    (re.compile(r"\b\d{2}-\d{2} <time>"), "<date> <time>"),
    (re.compile(r"\bcall_\d+\b"), "call_<n>"),
    (re.compile(r"\b\d+\.\d\d\b"), "<secs>"),
    (re.compile(r"\b\d+s ago\b"), "<n>s ago"),
    (re.compile(r"\b(January|February|March|April|May|June|July|August|September|October|November|December) "
                r"\d{1,2}\b"), "<day>"),
]


_RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")


def _normal(text: str) -> str:
    for pattern, token in _VARYING:
        text = pattern.sub(token, text)
    # columns are aligned to the widest value, which varies: compare the cells, not the padding
    return "\n".join(re.sub(r"(?<=\S) {2,}", "  ", line.rstrip()) for line in text.strip("\n").splitlines())


def _matches(expected: list[str], actual: str) -> bool:
    """``…`` in the README stands for anything (on one line or across lines); the rest must be as printed."""
    pattern = ".*?".join(re.escape(part) for part in _normal("\n".join(expected)).split("…"))
    return re.fullmatch(pattern, _normal(actual), re.S) is not None


def _by_label(lines: list[str]) -> dict[str, list[str]]:
    """Several agents' lines, interleaved as they ran concurrently: each agent's own, in order."""
    out: dict[str, list[str]] = {}
    for line in lines:
        label = line.split("] ", 1)[0] + "]"
        out.setdefault(label, []).append(line)
    return out


@pytest.fixture
def example_system(tmp_path: Path) -> Iterator[dict[str, str]]:
    """examples/tasks as `make run` starts it (a broker other terminals reach), and a second terminal's env."""
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None and "MICRO_BROKER=$${MICRO_BROKER:-local://} $(VENV)/bin/micro run examples/tasks" \
        in recipe.group(1)
    env = {**_env(tmp_path), "MICRO_BROKER": "local://"}
    proc, _ = _serve(["examples/tasks"], ROOT, env)
    try:
        yield {k: v for k, v in env.items() if k != "MICRO_BROKER"}  # the second terminal sets nothing
    finally:
        _stop(proc)


def test_the_transcripts_are_what_a_user_sees_top_to_bottom(example_system: dict[str, str]) -> None:
    ran = 0
    last_id = ""  # a run id in a command is the one the commands before printed (ids differ per run)
    for command, expected in transcripts():
        args = shlex.split(command, comments=True)
        if any(re.fullmatch(r"[A-Z_]+", a) for a in args):
            continue
        if last_id:
            args = [_RUN_ID.sub(last_id, a) for a in args]
        wide = max((len(line) for line in expected), default=0) > 80  # shown at the width it needs
        res = subprocess.run([*MICRO, *args[1:]], capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env={**example_system, "COLUMNS": "160"} if wide else example_system)
        refused = bool(expected) and expected[0].startswith("error:")  # the README shows a refusal
        assert (res.returncode != 0) == refused, f"$ {command}\n{res.stdout}{res.stderr}"
        printed = res.stderr if refused else res.stdout
        ran += 1
        last_id = next(iter(_RUN_ID.findall(res.stdout)), last_id)
        if not expected:
            continue  # the README shows no output for it
        if all(line.startswith("[") for line in expected) and len(_by_label(expected)) > 1:
            want, got = _by_label(expected), _by_label(printed.splitlines())
            assert want.keys() == got.keys(), f"$ {command}\n{printed}"
            for label, lines in want.items():
                assert _matches(lines, "\n".join(got[label])), f"$ {command}\n{label}:\n" + "\n".join(got[label])
        else:
            assert _matches(expected, printed), f"$ {command}\nREADME:\n" + "\n".join(expected) + \
                f"\nactual:\n{printed}"
    assert ran >= 8


def test_a_second_terminal_watches_and_makes_events_as_the_readme_says(example_system: dict[str, str]) -> None:
    block = next(b for b in re.findall(r"```console\n(.*?)```", README, re.S) if "$ micro subscribe" in b)
    sub_cmd, pub_cmd = (shlex.split(line[2:], comments=True) for line in block.splitlines() if line.startswith("$ "))
    sub = subprocess.Popen([*MICRO, *sub_cmd[1:], "-n", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT, env=example_system)
    try:
        assert sub.stderr is not None and sub.stderr.readline().strip() == "subscribed to events.user.*"
        res = subprocess.run([*MICRO, *pub_cmd[1:]], capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env=example_system)
        assert res.returncode == 0, res.stderr
        assert res.stdout == block.split(pub_cmd[-1], 1)[1].split("\n", 1)[1]  # as printed under it
        out, _ = sub.communicate(timeout=60)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    (line,) = out.splitlines()
    assert msgspec.json.decode(line)["data"] == {"id": "u9", "name": "Eve", "email": "eve@example.com"}
