"""Gateways: the services and agents of a registry, for clients that speak HTTP or MCP.

- :mod:`micro.gateway.http`: an ASGI app (starlette) that maps
  ``POST /api/{service}/{Handler.Method}`` to ``client.call`` and streams
  server-streaming endpoints as Server-Sent Events; ``micro api`` serves it.
- :mod:`micro.gateway.openapi`: the OpenAPI 3.1 document of that API, built from
  the JSON Schemas in the registry.
- :mod:`micro.gateway.mcp`: an MCP server (the official ``mcp`` SDK) that offers
  every endpoint as a tool and every agent as ``ask_{agent}``; ``micro mcp``
  serves it over stdio or streamable HTTP.

Both find services through the runtime's registry and call them through its
client, so they see exactly what ``micro call`` sees. They need the ``gateway``
extra (``pip install 'micro[gateway]'``).
"""


def micro_version() -> str:
    """The installed micro's version (``"0"`` from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("micro")
    except PackageNotFoundError:
        return "0"
