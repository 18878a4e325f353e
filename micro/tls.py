"""TLS for gRPC: contexts for servers (optionally requiring client certificates) and clients.

::

    server_tls = micro.tls.server_context("node.pem", "node.key", ca="ca.pem", require_client_cert=True)
    micro.New("task", tls=server_tls)

    client_tls = micro.tls.client_context(ca="ca.pem", cert="client.pem", key="client.key")
    micro.Runtime(tls=client_tls)

A service with TLS says so in its registry record (node metadata ``tls=true``);
clients use their runtime's context for such nodes (the system's CAs if the
runtime has none) and plain HTTP/2 for the others. Both sides speak ALPN ``h2``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

Pathish = str | Path


def server_context(cert: Pathish, key: Pathish, *, ca: Pathish | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """A server context from a certificate chain and key; ``ca`` verifies client certificates."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else (
        ssl.CERT_OPTIONAL if ca is not None else ssl.CERT_NONE)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def client_context(ca: Pathish | None = None, *, cert: Pathish | None = None,
                   key: Pathish | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca`` (the system's CAs without it), with an optional client certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    ctx.set_alpn_protocols(["h2"])
    return ctx
