"""The benchmark runner: ``python -m benchmarks [NAME ...]`` (``make bench`` runs them all).

Discovers every ``benchmarks/bench_*.py``, runs each module's ``async def run()``
in a fresh ``asyncio.run`` (one failing module is reported and the others still
run), prints each figure's line, and writes ``benchmarks/RESULTS.md``: a table
per module with the machine (nproc, Python) and the date. Running a subset
(``python -m benchmarks call store``) replaces only those modules' sections.
Exit status: 0 when every selected module ran, 1 when one failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import inspect
import os
import pkgutil
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
PREFIX = "bench_"

Figure = tuple[str, float, str]


@dataclass
class Outcome:
    name: str
    started: dt.datetime
    seconds: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    error: str | None = None


def discover() -> list[str]:
    """The short names (``call`` for ``bench_call.py``) of every benchmark module, sorted."""
    return sorted(
        m.name.removeprefix(PREFIX)
        for m in pkgutil.iter_modules([str(HERE)])
        if m.name.startswith(PREFIX) and not m.ispkg
    )


def _short(name: str) -> str:
    return name.removesuffix(".py").rsplit("/", 1)[-1].removeprefix(PREFIX)


def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> str:
    return (f"nproc {_nproc()} · Python {platform.python_version()} ({platform.python_implementation()}) · "
            f"{platform.system()} {platform.machine()}")


def _check(figures: object) -> list[Figure]:
    if not isinstance(figures, list):
        raise TypeError(f"run() returned {type(figures).__name__}, not a list of (name, value, line)")
    out: list[Figure] = []
    for item in figures:
        if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], Real) and not isinstance(item[1], bool) and isinstance(item[2], str)):
            raise TypeError(f"run() returned {item!r}: each figure must be a (str, float, str) tuple")
        out.append((item[0], float(item[1]), item[2]))
    return out


def run_one(name: str) -> Outcome:
    """Import ``benchmarks.bench_NAME`` and run its ``run()`` in a fresh event loop."""
    outcome = Outcome(name, dt.datetime.now(dt.UTC))
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.{PREFIX}{name}")
        fn = getattr(module, "run", None)
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"benchmarks/{PREFIX}{name}.py has no `async def run()`")
        outcome.figures = _check(asyncio.run(fn()))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit or a stray CancelledError from a module fails it, not the run
        traceback.print_exc()
        outcome.error = f"{type(exc).__name__}: {exc}".strip()
    outcome.seconds = time.perf_counter() - t0
    return outcome


# -- RESULTS.md ------------------------------------------------------------------------------

_SECTION = re.compile(r"^## (\S+)\s*$", re.MULTILINE)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def section(o: Outcome) -> str:
    stamp = f"{o.started:%Y-%m-%d %H:%M} UTC · {machine()} · {o.seconds:.0f} s"
    lines = [f"## {o.name}", "", f"_`python -m benchmarks {o.name}` · {stamp}_", ""]
    if o.error is not None:
        lines += [f"**Failed**: `{_cell(o.error)}`", ""]
    if o.figures:
        lines += ["| figure | value | result |", "| --- | ---: | --- |"]
        lines += [f"| `{_cell(n)}` | {_value(v)} | {_cell(line)} |" for n, v, line in o.figures]
        lines.append("")
    return "\n".join(lines)


def _old_sections(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    marks = list(_SECTION.finditer(text))
    return {
        m.group(1): text[m.start(): marks[i + 1].start() if i + 1 < len(marks) else len(text)].rstrip() + "\n"
        for i, m in enumerate(marks)
    }


def write_results(outcomes: list[Outcome], known: list[str], path: Path = RESULTS) -> None:
    """Replace the sections of the modules just run; keep the others' (still existing) sections."""
    sections = {k: v for k, v in _old_sections(path).items() if k in known}
    for o in outcomes:
        sections[o.name] = section(o)
    now = dt.datetime.now(dt.UTC)
    head = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks` (`make bench`); how to run and read them: "
        "[docs/benchmarks.md](../docs/benchmarks.md).",
        "Every figure is a ratio against a baseline measured in the same process and run (medians of "
        "several repetitions), so it holds across machines better than an absolute time would; the "
        "absolute numbers in the lines are context for this machine only.",
        "",
        f"Last written {now:%Y-%m-%d %H:%M} UTC on {machine()}. Each section names its own run.",
        "",
    ]
    body = [sections[k] for k in sorted(sections)]
    path.write_text("\n".join(head) + "\n" + "\n".join(body))


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    known = discover()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run micro's benchmarks and write benchmarks/RESULTS.md.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(known) or 'none found'}")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(known))
        return 0
    names = list(dict.fromkeys(_short(n) for n in args.names)) or known
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.print_usage(sys.stderr)
        print(f"unknown benchmark(s): {', '.join(unknown)} (have: {', '.join(known)})", file=sys.stderr)
        return 2
    print(f"micro benchmarks · {machine()}", flush=True)
    outcomes: list[Outcome] = []
    for name in names:
        print(f"\n== {name}", flush=True)
        o = run_one(name)
        outcomes.append(o)
        for _, _, line in o.figures:
            print(line, flush=True)
        status = f"FAILED: {o.error}" if o.error else f"{len(o.figures)} figures"
        print(f"-- {name}: {status} ({o.seconds:.0f} s)", flush=True)
    if not args.no_write:
        write_results(outcomes, known)
        print(f"\nwrote {RESULTS.relative_to(HERE.parent)}")
    failed = [o.name for o in outcomes if o.error]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
