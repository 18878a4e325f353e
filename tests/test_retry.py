"""Retries (idempotent endpoints only, on UNAVAILABLE) and the per-node circuit breaker."""

from __future__ import annotations

import msgspec
import pytest

import micro
from micro.client.retry import Breakers, RetryPolicy
from micro.errors import Unavailable
from micro.registry.memory import MemoryRegistry


class Q(msgspec.Struct):
    n: int = 0


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = {"Get": 0, "Charge": 0}

    @micro.idempotent
    async def Get(self, req: Q) -> Q:
        """Safe to repeat."""
        self.calls["Get"] += 1
        if self.calls["Get"] <= self.failures:
            raise Unavailable("warming up")
        return req

    async def Charge(self, req: Q) -> Q:
        """Not safe to repeat."""
        self.calls["Charge"] += 1
        if self.calls["Charge"] <= self.failures:
            raise Unavailable("warming up")
        return req


WIRES = ["grpc", "native"]


@pytest.mark.parametrize("wire", WIRES)
async def test_idempotent_endpoints_are_retried_and_others_are_not(wire: str) -> None:
    registry = MemoryRegistry()
    flaky = Flaky(failures=2)
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as server, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport=wire) as client:
        svc = micro.New("pay", runtime=server)
        svc.handle(flaky)
        async with svc:
            (rec,) = await client.registry.get("pay")
            assert rec.endpoint("Flaky.Get").metadata == {"idempotent": "true"}  # type: ignore[union-attr]
            assert rec.endpoint("Flaky.Charge").metadata == {}  # type: ignore[union-attr]
            assert await client.client.call("pay", "Flaky.Get", {"n": 1}) == {"n": 1}
            assert flaky.calls["Get"] == 3
            with pytest.raises(Unavailable, match="warming up"):
                await client.client.call("pay", "Flaky.Charge", {"n": 1})
            assert flaky.calls["Charge"] == 1


@pytest.mark.parametrize("wire", WIRES)
async def test_retries_stop_after_the_policy_attempts(wire: str) -> None:
    registry = MemoryRegistry()
    flaky = Flaky(failures=100)
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as server, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport=wire) as client:
        svc = micro.New("pay", runtime=server)
        svc.handle(flaky)
        async with svc:
            with pytest.raises(Unavailable, match="no node of 'pay' answered"):
                await client.client.call("pay", "Flaky.Get", {})
            assert flaky.calls["Get"] == RetryPolicy().attempts


@pytest.mark.parametrize("wire", WIRES)
async def test_a_dead_node_is_skipped_once_its_breaker_opens(wire: str) -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as a, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as b, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport=wire) as client:
        live = micro.New("svc", runtime=a)
        live.handle(Flaky(0))
        dead = micro.New("svc", runtime=b)
        dead.handle(Flaky(0))
        async with live:
            await dead.start()
            dead_record = dead.record
            await dead._stop_servers()  # the process is gone (both its wires), its record is not
            await registry.register(dead_record, ttl=60)
            dead_address = dead_record.nodes[0].address
            for _ in range(6):
                assert await client.client.call("svc", "Flaky.Get", {"n": 2}) == {"n": 2}
            assert client.client.breakers.is_open(dead_address)
            (rec,) = await client.registry.get("svc")
            for _ in range(4):  # whatever the round-robin turn, the open node comes last
                assert client.client._nodes(rec)[-1].address == dead_address
            await registry.deregister(dead_record)


def test_breaker_opens_after_threshold_and_closes_on_success() -> None:
    b = Breakers(threshold=2, cooldown=60)
    b.failure("n")
    assert not b.is_open("n")
    b.failure("n")
    assert b.is_open("n")
    b.success("n")
    assert not b.is_open("n")


def test_backoff_is_bounded_and_jittered() -> None:
    p = RetryPolicy(attempts=5, base=0.1, cap=0.3)
    delays = [p.delay(k) for k in range(1, 6) for _ in range(50)]
    assert all(0 <= d <= 0.3 for d in delays)
    assert len(set(delays)) > 10
