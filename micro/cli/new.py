"""``micro new NAME [--agent] [--proto] [--dir PATH]``: a project that runs and passes its tests at once.

The project is a code-first service (msgspec Structs), or with ``--proto`` a
proto-first one (a ``.proto``, the betterproto2 code generated from it, and a
``make proto`` target); with ``--agent`` an agent over it (Claude with
``ANTHROPIC_API_KEY``, a labelled scripted demo model without). It has an
``app.py`` for ``micro run``, tests that use ``micro.testing``, and a README.

The files come from the templates in ``micro/templates/new`` (``string.Template``:
``$name`` placeholders, ``$$`` for a dollar sign). The project is built in a
temporary directory beside the target and moved into place when complete, so a
failure leaves nothing behind; an existing non-empty directory is never touched.
"""

from __future__ import annotations

import importlib.util
import json
import keyword
import os
import re
import shutil
import string
import subprocess
import sys
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import click

from micro.agent.tools import tool_name
from micro.cli.main import fail, main, out
from micro.codec.proto_file import package_name
from micro.errors import UsageError

__all__ = ["Project", "render", "scaffold"]

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
# names the handler module already uses for its message types
_TAKEN = {"Item", "CreateRequest", "GetRequest", "ListRequest", "ItemResponse", "ListResponse"}
PROTOC_OPTIONS = ("client_generation=async", "server_generation=async")


@dataclass(frozen=True)
class Project:
    """What ``micro new`` makes: a service named ``name``, maybe an agent, maybe proto-first."""

    name: str
    agent: bool = False
    proto: bool = False

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise UsageError(
                f"invalid project name {self.name!r}: use a lower-case letter, then letters, digits, '-' or '_' "
                "(at most 40), e.g. micro new notes"
            )
        if self.proto and keyword.iskeyword(self.package):
            raise UsageError(f"{self.name!r} is a Python keyword, which a proto package cannot be: pick another name")

    @property
    def package(self) -> str:
        """The protobuf package (and Python module under ``_proto``)."""
        return self.name.replace("-", "_")

    @property
    def cls(self) -> str:
        """The handler class: ``my-notes`` -> ``MyNotes``."""
        cls = "".join(part.capitalize() for part in re.split(r"[-_]+", self.name) if part)
        return f"{cls}Service" if cls in _TAKEN else cls

    @property
    def agent_name(self) -> str:
        return f"{self.name}-agent"

    def values(self) -> dict[str, str]:
        return {
            "name": self.name,
            "package": self.package,
            "Class": self.cls,
            "agent": self.agent_name,
            "tool_create": tool_name(self.name, f"{self.cls}.Create"),
            "tool_list": tool_name(self.name, f"{self.cls}.List"),
            "agent_doc": " and an agent over it" if self.agent else "",
            "variant": " --proto" if self.proto else "",
            "proto_extra": ('\nproto = ["grpcio-tools>=1.60", "betterproto2-compiler==0.10.1"]  # for `make proto`'
                            if self.proto else ""),
            "micro_requirement": micro_requirement(),
        }


def micro_requirement() -> str:
    """How a new project depends on micro: on this checkout (a path dependency) when micro runs from one,
    else on the installed version by name."""
    import micro

    root = Path(micro.__file__).resolve().parent.parent
    meta = root / "pyproject.toml"
    if meta.is_file() and re.search(r'^name = "micro"$', meta.read_text(encoding="utf-8"), re.M):
        return f"micro[all] @ {root.as_uri()}"
    from importlib.metadata import version

    return f"micro[all]>={version('micro')}"


def _template(name: str, values: dict[str, str]) -> str:
    text = (resources.files("micro") / "templates" / "new" / name).read_text(encoding="utf-8")
    return string.Template(text).substitute(values)


def render(project: Project) -> dict[str, str]:
    """The files of ``project`` (relative path -> text), before code generation."""
    v = project.values()
    if project.agent:
        v["agent_try"] = (f"\n    micro call {project.agent_name} Agent.Chat '{{\"message\": \"show my list\"}}'"
                          f"\n    micro chat -m \"add Buy milk\"")
        v["imports"] = f"import micro\n\nfrom agent import make_agent\nfrom handler import {project.cls}"
        v["agent_block"] = "\nagent = make_agent()\n"
    else:
        v["agent_try"] = ""
        v["imports"] = f"import micro\n\nfrom handler import {project.cls}"
        v["agent_block"] = ""
    files = [("gitignore.tmpl", ".gitignore"), ("pyproject.toml.tmpl", "pyproject.toml"),
             ("conftest.py.tmpl", "conftest.py"), ("app.py.tmpl", "app.py"),
             ("test_service.py.tmpl", "tests/test_service.py")]
    rows = []
    sections = []
    if project.proto:
        files += [("handler_proto.py.tmpl", "handler.py"), ("service.proto.tmpl", f"proto/{project.package}.proto")]
        rows += [f"| `proto/{project.package}.proto` | the service and its messages; the source of `_proto/` |",
                 "| `_proto/` | generated by `make proto` from the `.proto` (do not edit) |",
                 "| `Makefile` | `make run`, `make test`, `make proto` |"]
        sections.append(_template("readme_proto.md.tmpl", v))
        v["proto_target"] = _template("makefile_proto.tmpl", v)
        v["proto_phony"] = " proto"
    else:
        files.append(("handler.py.tmpl", "handler.py"))
        rows.append("| `Makefile` | `make run`, `make test` |")
        v["proto_target"] = v["proto_phony"] = ""
    v["grpc_service"] = f"{project.package if project.proto else package_name(project.name)}.{project.cls}"
    sections.append(_template("readme_grpc.md.tmpl", v))
    if project.agent:
        files += [("agent.py.tmpl", "agent.py"), ("test_agent.py.tmpl", "tests/test_agent.py")]
        rows.append(f"| `agent.py` | the `{project.agent_name}` agent over the service |")
        sections.append(_template("readme_agent.md.tmpl", v))
    v["files"] = "".join(f"\n{r}" for r in rows)
    v["sections"] = "".join(sections)
    rendered = {path: _template(tmpl, v) for tmpl, path in files}
    rendered["Makefile"] = _template("Makefile.tmpl", v)
    rendered["README.md"] = _template("README.md.tmpl", v)
    return rendered


def check_target(dest: Path) -> None:
    """Refuse an existing file, or a directory with anything in it."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise UsageError(f"{dest} exists and is not a directory: pick another name or --dir")
    if dest.is_dir() and any(dest.iterdir()):
        raise UsageError(f"{dest} already exists and is not empty: pick another name or --dir (nothing was written)")


def scaffold(project: Project, dest: Path) -> list[str]:
    """Write ``project`` to ``dest`` (which must not exist, or be empty); the relative paths written."""
    check_target(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # not mkdtemp: the project gets the umask's permissions, not 0700
    moved = False
    try:
        for rel, text in render(project).items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if project.proto:
            generate_proto(tmp)
        check_target(dest)  # nobody wrote there meanwhile
        if dest.is_dir():
            dest.rmdir()
        os.replace(tmp, dest)
        moved = True
    finally:
        if not moved:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def generate_proto(root: Path) -> None:
    """Generate ``_proto/`` from ``proto/*.proto`` with grpc_tools.protoc and the betterproto2 plugin."""
    hint = "pip install grpcio-tools 'betterproto2-compiler==0.10.1'"
    if importlib.util.find_spec("grpc_tools") is None:
        raise UsageError(f"--proto needs grpcio-tools to generate code from the .proto: {hint}")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if shutil.which("protoc-gen-python_betterproto2", path=env["PATH"]) is None:
        raise UsageError(f"--proto needs the betterproto2 protoc plugin (protoc-gen-python_betterproto2): {hint}")
    (root / "_proto").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", "--python_betterproto2_out=_proto",
           *(f"--python_betterproto2_opt={o}" for o in PROTOC_OPTIONS),
           *sorted(str(p.relative_to(root)) for p in (root / "proto").glob("*.proto"))]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise UsageError(f"protoc failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")


@main.command()
@click.argument("name")
@click.option("--agent", is_flag=True, help="Also write an agent whose tools are the service's endpoints.")
@click.option("--proto", is_flag=True, help="Proto-first: a .proto, the betterproto2 code made from it, make proto.")
@click.option("--dir", "directory", type=click.Path(path_type=Path), help="Where to write it (default: ./NAME).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def new(name: str, agent: bool, proto: bool, directory: Path | None, as_json: bool) -> None:
    """Create a project: a service NAME (and with --agent, an agent over it), app.py, tests, a README.

    `micro run` works in it at once, and so does `python -m pytest`.

    \b
    Example:
      micro new notes --agent && cd notes && micro run .
    """
    try:
        project = Project(name, agent=agent, proto=proto)
        dest = directory if directory is not None else Path(name)
        files = scaffold(project, dest)
    except UsageError as exc:
        fail(str(exc), 2)
        return
    if as_json:
        out.print_json(json.dumps({"path": str(dest), "files": files}))
        return
    kind = ("proto-first" if proto else "code-first") + " service" + (" and agent" if agent else "")
    out.print(f"[green]created[/green] {dest}/ ({kind} [bold]{name}[/bold])")
    for f in files:
        if not f.startswith("_proto/"):
            out.print(f"  {f}", markup=False)
    if proto:
        out.print("  _proto/ (generated)", markup=False)
    out.print(f"\nnext:\n  cd {dest}\n  micro run .          # then: micro call {name} {project.cls}.List '{{}}'"
              "\n  python -m pytest\nin a virtualenv of its own (micro comes from pyproject.toml's dependency):"
              "\n  python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]'", markup=False)
