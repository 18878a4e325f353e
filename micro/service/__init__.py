"""Services: handlers become endpoints served over gRPC and in process."""

from micro.service.endpoints import Endpoint, endpoints_of
from micro.service.service import AgentServiceOptions, Service, ServiceOptions

__all__ = ["AgentServiceOptions", "Endpoint", "Service", "ServiceOptions", "endpoints_of"]
