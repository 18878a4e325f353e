"""Installing: `make run` installs only what running needs, `make test` adds the dev tools, `make dist` builds a
wheel that works on its own, and `micro new` projects depend on micro in their pyproject.toml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]


def make_n(target: str, tmp_path: Path) -> str:
    """The commands `make TARGET` would run for a fresh virtualenv (make -n: nothing runs)."""
    res = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_run_installs_only_what_running_needs_and_make_test_adds_the_dev_tools(tmp_path: Path) -> None:
    run = make_n("run", tmp_path)
    installs = [line for line in run.splitlines() if "pip install" in line]
    assert len(installs) == 1 and installs[0].endswith("-e '.[all]'"), installs
    assert "--progress-bar on" in installs[0] and " -q" not in installs[0]  # the first install shows progress
    assert "micro run examples/tasks" in run and ". " + str(tmp_path / "venv") + "/bin/activate" in run
    test = make_n("test", tmp_path)
    installs = [line for line in test.splitlines() if "pip install" in line]
    assert [i.rsplit(" ", 1)[1] for i in installs] == ["'.[all]'", "'.[dev]'"]
    assert not any(" -q" in i for i in installs)


def test_make_dist_builds_a_wheel_that_runs_on_its_own(tmp_path: Path) -> None:
    res = subprocess.run(["make", "dist", f"DIST={tmp_path / 'dist'}", f"VENV={Path(sys.executable).parent.parent}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("micro-*-py3-none-any.whl")
    installed = tmp_path / "site"  # a pure wheel installs by unpacking
    with zipfile.ZipFile(wheel) as z:
        z.extractall(installed)
    env = {**os.environ, "PYTHONPATH": str(installed)}  # the wheel's micro, before this checkout's editable one
    where = subprocess.run([sys.executable, "-c", "import micro; print(micro.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=60)
    assert where.stdout.startswith(str(installed)), where
    res = subprocess.run([*MICRO, "new", "notes", "--agent"], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120)  # its templates are in the wheel
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "notes" / "app.py").is_file() and (tmp_path / "notes" / "agent.py").is_file()
    meta = tomllib.loads((tmp_path / "notes" / "pyproject.toml").read_text())
    assert meta["project"]["dependencies"] == [f"micro[all]>={_version()}"]  # from a wheel: by name


def _version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_a_new_project_depends_on_this_checkout_and_installs(tmp_path: Path) -> None:
    res = subprocess.run([*MICRO, "new", "notes"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pip install -e '.[test]'" in res.stdout  # micro new says how
    project = tmp_path / "notes"
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    assert meta["project"]["dependencies"] == [f"micro[all] @ {ROOT.as_uri()}"]
    assert "pip install -e '.[test]'" in (project / "README.md").read_text()
    report = tmp_path / "report.json"  # what pip would install into a virtualenv of the project's own
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                          "--report", str(report), "-e", f"{project}[test]", f"micro[all] @ {ROOT.as_uri()}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    names = {item["metadata"]["name"]: item for item in json.loads(report.read_text())["install"]}
    assert set(names) == {"notes", "micro"}
    assert names["notes"]["metadata"]["requires_dist"][0] == f"micro[all] @ {ROOT.as_uri()}"
