"""The gRPC server (grpclib) that serves a service's endpoints over HTTP/2."""

from micro.server.grpc import GrpcServer, RawCodec

__all__ = ["GrpcServer", "RawCodec"]
