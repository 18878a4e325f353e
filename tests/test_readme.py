"""The README's tour runs as printed: copied out of README.md and run as a program of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tour() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## A tour", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README.md's tour has no python block"
    return match.group(1)


def test_the_tour_runs_as_printed(tmp_path: Path) -> None:
    script = tmp_path / "tour.py"
    script.write_text(tour())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "MICRO_"))}
    env["MICRO_HOME"] = str(tmp_path / "home")  # its own machine-wide registry and file store
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    call, reply = res.stdout.splitlines()
    assert "'total': 1" in call and "Write quarterly report" in call  # the endpoint answered over the call path
    assert "What tasks are overdue for Alice?" in reply and "scripted" in reply  # the key-free model, labelled
