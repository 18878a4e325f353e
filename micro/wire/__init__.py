"""micro's native wire: length-prefixed frames over TCP between micro processes.

``frames`` is the framing (specified in ``docs/wire.md``), ``server`` the listener a
service runs beside its gRPC server. The client side is
:class:`micro.client.native.NativePool`.
"""
