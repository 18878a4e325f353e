"""No module of micro reaches into another package's private names.

A *package* is a folder under ``micro/`` (``micro/broker/``) or a top-level module
(``micro/runtime.py``). The test walks every module with ``ast`` and fails on

- ``from micro.<other>… import _name``, or an import from a private module of another
  package (``from micro.store._base import …``);
- ``obj._attr`` where ``obj`` is not ``self``/``cls`` and no module of this package
  defines ``_attr`` (a heuristic: a name the package defines is its own business).

What another package needs becomes public and documented. The allow-list below names
the few third-party internals micro has to touch, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import micro

ROOT = Path(micro.__file__).parent

ALLOWED: dict[tuple[str, str], str] = {
    ("resource.py", "_replace"): "namedtuple._replace is the public API of urlsplit's result",
    ("codec/proto.py", "_betterproto"): "betterproto2 keeps a message's field metadata there; no public accessor",
    ("server/grpc.py", "_stream"): "grpclib's Stream holds the h2 stream (its id, for flow control) privately",
    ("server/grpc.py", "_handlers"): "grpclib's Server keeps its connection handlers privately (graceful drain)",
    ("server/grpc.py", "_tasks"): "grpclib's Handler keeps its request tasks privately (graceful drain; "
                                  "_Handler.cancel/close cancel them with micro.cancel: see _CANCELS)",
    ("server/grpc.py", "_cancelled"): "grpclib's Handler's cancelled tasks, which Server.wait_closed waits for: "
                                      "_Handler.cancel/close add theirs as grpclib's do (see _CANCELS)",
    ("broker/nats.py", "_status"): "nats-py's connection state, read on the publish hot path (see _DIRECT)",
    ("broker/nats.py", "_max_payload"): "nats-py's server size limit, read on the publish hot path (see _DIRECT)",
    ("broker/nats.py", "_pending"): "nats-py's pending buffer: the hot path appends its PUB there when the "
                                    "state check passes, with nothing awaited between (guarded by _DIRECT)",
    ("broker/nats.py", "_pending_data_size"): "nats-py's pending buffer's size, kept with the append (see _DIRECT)",
    ("broker/nats.py", "_max_pending_size"): "nats-py's bound of that buffer: a full one waits for the socket",
    ("broker/nats.py", "_flush_queue"): "nats-py's flusher kick, taken as Client.publish takes it (see _DIRECT)",
    ("broker/nats.py", "_flush_pending"): "nats-py's flusher kick, awaited as Client.publish awaits it",
    ("broker/nats.py", "_start"): "nats-py's Subscription._start, whose source _PLAIN_CALLBACKS reads at import",
    ("broker/nats.py", "_wait_for_msgs"): "nats-py's subscription task, whose source _PLAIN_CALLBACKS reads at import",
    ("cancel.py", "_task_states"): "anyio's record of each task's cancel scopes: whether a task is inside a "
                                    "shielded scope, read only when a call is cancelled (see SHIELDS)",
    ("cancel.py", "_parent_scope"): "anyio's link from a cancel scope to the one around it (see SHIELDS)",
}
"""(module, private attribute) -> why it is touched."""

ALLOWED_MODULES: dict[str, str] = {
    "micro._proto": "generated protobuf code: private so nobody edits it, imported by design",
}


def _package(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "_proto" not in p.relative_to(ROOT).parts)


def _defined(paths: list[Path]) -> dict[str, set[str]]:
    """Every name each package defines: functions, classes, assigned names and attributes, arguments."""
    out: dict[str, set[str]] = {}
    for path in paths:
        names = out.setdefault(_package(path), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return out


def violations() -> list[str]:
    paths = _modules()
    defined = _defined(paths)
    found = []
    for path in paths:
        package, where = _package(path), path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("micro."):
                parts = node.module.split(".")[1:]
                if parts[0] == package or any(node.module.startswith(m) for m in ALLOWED_MODULES):
                    continue
                for alias in node.names:
                    if _private(alias.name) or any(_private(p) for p in parts):
                        found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if node.attr in defined[package] or (where, node.attr) in ALLOWED:
                    continue
                found.append(f"{where}:{node.lineno}: {ast.unparse(node.value)[:40]}.{node.attr}")
    return found


def test_no_private_names_across_packages() -> None:
    assert violations() == []


def test_the_check_finds_a_reach_across_packages(tmp_path: Path) -> None:
    """The walker itself: a cross-package private import and attribute are found, own names are not."""
    tree = ast.parse("from micro.runtime import _by_loop\nclient._pool(node)\nself._mine\n")
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    attrs = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _private(n.attr)
             and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]
    assert [a.name for i in imports for a in i.names if _private(a.name)] == ["_by_loop"]
    assert attrs == ["_pool"]
    assert "_pool" not in _defined([ROOT / "broker" / "local.py"])["broker"]


def test_every_allowed_entry_is_still_needed() -> None:
    """An allow-list entry whose access is gone must go too."""
    used = set()
    for path in _modules():
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (where, node.attr) in ALLOWED:
                used.add((where, node.attr))
    assert set(ALLOWED) == used
