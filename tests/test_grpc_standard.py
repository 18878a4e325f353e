"""The standard gRPC services of every micro port, through Google's official clients.

grpcio-health-checking's stubs check health (overall, per gRPC service, per micro
service) and keep a ``Watch`` open across a drain; grpcio-reflection's
``ProtoReflectionDescriptorDatabase`` lists and resolves the services, and a request
built from the descriptors it returns calls a code-first endpoint over protobuf.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import msgspec
import pytest
from _proto.greeter import HelloReply, HelloRequest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import micro
from micro.registry import ServiceRecord
from micro.registry.memory import MemoryRegistry


class Line(msgspec.Struct):
    sku: str
    qty: int = 1


class OrderRequest(msgspec.Struct):
    customer: str
    lines: list[Line]
    deliver_by: dt.datetime | None = None


class OrderReply(msgspec.Struct):
    id: str
    items: int
    deliver_by: dt.datetime | None = None


class Shop:
    async def Order(self, req: OrderRequest) -> OrderReply:
        """Place an order."""
        return OrderReply(f"{req.customer}-1", sum(line.qty for line in req.lines), req.deliver_by)


class Greeter:
    async def SayHello(self, req: HelloRequest) -> HelloReply:
        """Greet."""
        return HelloReply(message=f"hello {req.name}, {len(req.counts)} counts", index=req.times)


class HeldRegistry(MemoryRegistry):
    """A registry whose deregistration waits for the test: what a drain does before it is visible."""

    def __init__(self) -> None:
        super().__init__()
        self.deregistering = asyncio.Event()
        self.let_go = asyncio.Event()

    async def deregister(self, record: ServiceRecord) -> None:
        self.deregistering.set()
        await self.let_go.wait()
        await super().deregister(record)


@pytest.fixture
async def shop() -> AsyncIterator[micro.Service]:
    async with micro.Runtime(registry=HeldRegistry(), store="memory://", broker="memory://") as rt:
        service = micro.Service("shop-api", runtime=rt)
        service.handle(Shop())
        service.handle(Greeter())  # proto-first, package greeter
        async with service:
            yield service
            rt.registry.let_go.set()


async def test_health_check_overall_per_grpc_service_and_per_micro_service(shop: micro.Service) -> None:
    async with grpc.aio.insecure_channel(shop.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "shop_api.Shop", "shop-api"):
            rsp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert rsp.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope.Nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.List(health_pb2.HealthListRequest())
        names = ("", "shop_api.Shop", "greeter.Greeter", "shop-api")
        serving = health_pb2.HealthCheckResponse.SERVING
        assert {k: v.status for k, v in listed.statuses.items()} == dict.fromkeys(names, serving)


async def test_watch_sees_not_serving_before_the_node_deregisters_then_ends(shop: micro.Service) -> None:
    registry: HeldRegistry = shop.runtime.registry  # type: ignore[assignment]
    async with grpc.aio.insecure_channel(shop.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="shop_api.Shop"))
        updates = watch.__aiter__()
        assert (await anext(updates)).status == health_pb2.HealthCheckResponse.SERVING
        unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"))
        assert (await anext(unknown.__aiter__())).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        stopping = asyncio.create_task(shop.stop())
        assert (await anext(updates)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await registry.deregistering.wait()
        assert not registry.let_go.is_set()  # NOT_SERVING arrived while the node was still registered
        # a Check during the drain (before the port closes) says so too
        check = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        registry.let_go.set()
        await stopping
        with pytest.raises(StopAsyncIteration):  # the server ended the stream when it stopped
            await anext(updates)
        assert await watch.code() == grpc.StatusCode.OK


def _reflect(address: str) -> tuple[list[str], Any, Any]:
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindMethodByName("shop_api.Shop.Order")
        health = pool.FindServiceByName("grpc.health.v1.Health")
        request_cls = message_factory.GetMessageClass(method.input_type)
        reply_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls(customer="ann", lines=[{"sku": "a", "qty": 2}, {"sku": "b", "qty": 3}])
        request.deliver_by.FromDatetime(dt.datetime(2030, 5, 6, 7, 8, 9, tzinfo=dt.UTC))
        call = channel.unary_unary("/shop_api.Shop/Order", request_serializer=request_cls.SerializeToString,
                                   response_deserializer=reply_cls.FromString)
        reply = call(request, timeout=10)
        # a proto-first endpoint: its descriptor rebuilt from the betterproto2 classes
        hello = pool.FindMethodByName("greeter.Greeter.SayHello")
        hello_cls = message_factory.GetMessageClass(hello.input_type)
        greet = channel.unary_unary("/greeter.Greeter/SayHello", request_serializer=hello_cls.SerializeToString,
                                    response_deserializer=message_factory.GetMessageClass(hello.output_type).FromString)
        greeted = greet(hello_cls(name="ann", times=2, tone="TONE_WARM", counts={"a": 1}), timeout=10)
        return services, (reply, greeted), [m.name for m in health.methods]


async def test_reflection_lists_and_resolves_and_a_dynamic_request_calls_the_endpoint(shop: micro.Service) -> None:
    services, (reply, greeted), health_methods = await asyncio.to_thread(_reflect, shop.address)
    assert services == ["greeter.Greeter", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                        "grpc.reflection.v1alpha.ServerReflection", "shop_api.Shop"]
    assert (greeted.message, greeted.index) == ("hello ann, 1 counts", 2)
    assert (reply.id, reply.items) == ("ann-1", 5)
    assert reply.deliver_by.ToDatetime(tzinfo=dt.UTC) == dt.datetime(2030, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    assert health_methods == ["Check", "List", "Watch"]


async def _list_services(address: str, version: str) -> tuple[list[str], Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such")]
        replies = [r async for r in info(iter(requests))]
    return [s.name for s in replies[0].list_services_response.service], replies[1].error_response


async def test_reflection_v1_answers_as_v1alpha_does(shop: micro.Service) -> None:
    v1, missing = await _list_services(shop.address, "v1")
    assert v1 == (await _list_services(shop.address, "v1alpha"))[0]
    assert "shop_api.Shop" in v1
    assert missing.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_reflection_can_be_turned_off_health_stays() -> None:
    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        service = micro.Service("quiet", runtime=rt, reflection=False)
        service.handle(Shop())
        async with service, grpc.aio.insecure_channel(service.address) as channel:
            for version in ("v1", "v1alpha"):
                # no request sent: the answer comes before grpcio could write one (it reports that as INTERNAL)
                call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo")(
                    iter(()))
                assert await call.code() == grpc.StatusCode.UNIMPLEMENTED
            rsp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert rsp.status == health_pb2.HealthCheckResponse.SERVING
