"""TLS on gRPC: server certificates, mutual TLS, and what happens without the right credentials."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import trustme

import micro
from micro.errors import Unavailable
from micro.registry import Node
from micro.registry.memory import MemoryRegistry
from micro.tls import client_context, server_context
from micro.wire import unix


class Echo(msgspec.Struct):
    text: str


class Say:
    async def Echo(self, req: Echo) -> Echo:
        """Echo."""
        return req


class Pki:
    def __init__(self, where: Path) -> None:
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("client@micro")
        self.ca = where / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        self.server_cert, self.server_key = where / "server.pem", where / "server.key"
        server.private_key_and_cert_chain_pem.write_to_path(str(self.server_cert))
        server.private_key_pem.write_to_path(str(self.server_key))
        self.client_cert = where / "client.pem"
        client.private_key_and_cert_chain_pem.write_to_path(str(self.client_cert))
        other = trustme.CA()
        self.other_ca = where / "other-ca.pem"
        other.cert_pem.write_to_path(str(self.other_ca))


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    yield Pki(tmp_path)


WIRES = ["grpc", "native"]


@pytest.mark.parametrize("wire", WIRES)
async def test_tls_and_mutual_tls(pki: Pki, wire: str) -> None:
    registry = MemoryRegistry()
    server_tls = server_context(pki.server_cert, pki.server_key, ca=pki.ca, require_client_cert=True)
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as server_rt:
        svc = micro.New("secure", runtime=server_rt, tls=server_tls)
        svc.handle(Say())
        async with svc:
            assert svc.record.nodes[0].metadata["tls"] == "true"
            assert unix.UNIX not in svc.record.nodes[0].metadata  # certificates, not a socket file, say who
            good = client_context(pki.ca, cert=pki.client_cert)
            async with micro.Runtime(registry=registry, store="memory://", broker="memory://", tls=good,
                                     transport=wire) as rt:
                assert await rt.client.call("secure", "Say.Echo", {"text": "hi"}) == {"text": "hi"}

            no_cert = client_context(pki.ca)  # the server requires a client certificate
            async with micro.Runtime(registry=registry, store="memory://", broker="memory://", tls=no_cert,
                                     transport=wire) as rt:
                with pytest.raises(Unavailable):
                    await rt.client.call("secure", "Say.Echo", {"text": "hi"}, timeout=10)

            wrong_ca = client_context(pki.other_ca, cert=pki.client_cert)  # cannot verify the server
            async with micro.Runtime(registry=registry, store="memory://", broker="memory://",
                                     tls=wrong_ca, transport=wire) as rt:
                with pytest.raises(Unavailable):
                    await rt.client.call("secure", "Say.Echo", {"text": "hi"}, timeout=10)


@pytest.mark.parametrize("wire", WIRES)
async def test_server_tls_without_client_certificates(pki: Pki, wire: str) -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as server_rt:
        svc = micro.New("secure", runtime=server_rt, tls=server_context(pki.server_cert, pki.server_key))
        svc.handle(Say())
        plain = micro.New("plain", runtime=server_rt)
        plain.handle(Say())
        async with svc, plain:
            async with micro.Runtime(registry=registry, store="memory://", broker="memory://",
                                     tls=client_context(pki.ca), transport=wire) as rt:
                assert await rt.client.call("secure", "Say.Echo", {"text": "a"}) == {"text": "a"}
                # the same runtime still reaches plaintext services
                assert await rt.client.call("plain", "Say.Echo", {"text": "b"}) == {"text": "b"}



@pytest.fixture
def sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A socket directory of this test's own (short: sun_path holds 107 bytes)."""
    where = Path(f"/tmp/mt-{os.getpid()}-{tmp_path.name[-12:]}")
    monkeypatch.setenv("MICRO_SOCKET_DIR", str(where))
    yield str(where)
    for entry in where.glob("*"):
        entry.unlink()
    if where.exists():
        where.rmdir()


async def test_tls_set_after_construction_serves_no_unix_socket_and_a_client_ignores_one_on_a_tls_node(
        pki: Pki, sockets: str) -> None:
    """Whether a node serves a Unix socket is decided at start, from ``svc.tls`` as it is then; and a client
    never takes a TLS node's ``native_unix`` path (a registry record could name one)."""
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as server_rt, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native",
                          tls=client_context(pki.ca, cert=pki.client_cert)) as rt:
        svc = micro.New("secure", runtime=server_rt)
        svc.tls = server_context(pki.server_cert, pki.server_key, ca=pki.ca, require_client_cert=True)
        svc.handle(Say())
        async with svc:
            node = svc.record.nodes[0]
            assert node.metadata["tls"] == "true" and unix.UNIX not in node.metadata
            assert not glob.glob(f"{sockets}/*")  # no plaintext socket served
            md = {**node.metadata, unix.UNIX: f"{sockets}/planted.sock", unix.HOST: unix.host_id()}
            pool = rt.client.channel(Node(id=node.id, address=node.address, metadata=md))
            assert getattr(pool, "unix", "?") is None  # TLS over TCP, not the path the record names
            assert await rt.client.call("secure", "Say.Echo", {"text": "hi"}) == {"text": "hi"}
