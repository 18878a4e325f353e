"""micro: an asyncio-native microservice runtime (services, agents and flows on one loop)."""
