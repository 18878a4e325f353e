"""Services: handlers become endpoints served over gRPC and in process."""

from micro.service.endpoints import Endpoint, endpoints_of
from micro.service.service import Service

__all__ = ["Endpoint", "Service", "endpoints_of"]
