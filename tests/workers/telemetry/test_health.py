"""Health checks as plain data, their stored results, the fleet view and the worker probes."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import fakeredis
import pytest

from policies import keys
from policies.breaker import CircuitBreaker, RedisBreakerStore
from policies.breaker.config import BreakerConfig
from policies.degradation import Degradation, DegradationConfig
from policies.degradation.store import RedisDegradationStore
from workers.fleet import (
    HEALTH_LAST_RUN_KEY,
    HEALTH_RESULTS_KEY,
    FleetSnapshot,
    HealthResult,
    heartbeat_key,
    priority_queues,
    read_fleet,
)
from workers.ops.status import render_health
from workers.telemetry.health import (
    CHECKS,
    Check,
    HealthContext,
    Outcome,
    in_check_order,
    run_checks,
    store_results,
    worst,
)
from workers.telemetry.probes import WorkerProbe

QUEUES = ("payments", "default", "alerts", "deadletter")


def context(
    client: fakeredis.FakeRedis, *, threshold: int = 5, now: float | None = None
) -> HealthContext:
    return HealthContext(
        policy=client,
        broker=client,
        snapshot=read_fleet(client, client, QUEUES),
        backlog_threshold=threshold,
        heartbeat_ttl=30.0,
        now=(lambda: now) if now is not None else time.time,
    )


def heartbeat(client: fakeredis.FakeRedis, hostname: str, queues: list[str], at: float) -> None:
    value = {"hostname": hostname, "pid": 1, "queues": queues, "at": at}
    client.set(heartbeat_key(hostname), json.dumps(value))
    client.sadd(keys.index("worker"), hostname)


def results(client: fakeredis.FakeRedis, **kw: float) -> dict[str, HealthResult]:
    return {r.check: r for r in run_checks(context(client, **kw))}  # type: ignore[arg-type]


class TestChecks:
    """Each check reports healthy, degraded or unhealthy from what Redis holds."""

    def test_a_quiet_fleet_with_every_queue_served_is_healthy(
        self, fake_redis: fakeredis.FakeRedis
    ) -> None:
        heartbeat(fake_redis, "a@h", ["payments", "default", "alerts"], time.time())
        found = results(fake_redis)
        assert [c.name for c in CHECKS] == list(found)
        assert {r.status for r in found.values()} == {"healthy"}, found

    def test_backlog_counts_priority_sub_queues(self, fake_redis: fakeredis.FakeRedis) -> None:
        for sub in priority_queues("payments"):
            fake_redis.rpush(sub, *["m"] * 2)  # 8 in all, none over 5 alone
        result = results(fake_redis)["queue_backlog"]
        assert result.status == "degraded"
        assert "payments=8" in result.message

    def test_open_breaker_degrades(self, fake_redis: fakeredis.FakeRedis) -> None:
        breaker = CircuitBreaker(
            "pay", BreakerConfig.from_mapping({}), RedisBreakerStore(fake_redis)
        )
        breaker.force_open()
        result = results(fake_redis)["breakers"]
        assert result.status == "degraded" and "pay (forced_open)" in result.message

    def test_offline_service_is_unhealthy_and_degraded_one_degrades(
        self, fake_redis: fakeredis.FakeRedis
    ) -> None:
        store = RedisDegradationStore(fake_redis)
        Degradation("pay", store, DegradationConfig()).set_level("degraded")
        assert results(fake_redis)["degradation"].status == "degraded"
        Degradation("mail", store, DegradationConfig()).set_level("offline")
        result = results(fake_redis)["degradation"]
        assert result.status == "unhealthy" and "mail" in result.message

    def test_heartbeats_missing_stale_or_leaving_queues_unserved(
        self, fake_redis: fakeredis.FakeRedis
    ) -> None:
        assert results(fake_redis)["workers"].status == "unhealthy"
        now = 1000.0
        heartbeat(fake_redis, "old@h", ["payments", "default", "alerts"], now - 25)
        result = results(fake_redis, now=now)["workers"]
        assert result.status == "degraded" and "stale heartbeat: old@h" in result.message
        heartbeat(fake_redis, "old@h", ["payments"], now)
        result = results(fake_redis, now=now)["workers"]
        assert (
            result.status == "degraded" and "no worker consumes: alerts, default" in result.message
        )

    def test_a_check_that_raises_is_unhealthy_with_its_error(
        self, fake_redis: fakeredis.FakeRedis
    ) -> None:
        def boom(ctx: HealthContext) -> Outcome:
            raise ConnectionError("refused")

        (result,) = run_checks(context(fake_redis), [Check("boom", boom)])
        assert result.status == "unhealthy"
        assert result.message == "ConnectionError: refused"
        assert result.latency_seconds >= 0

    def test_an_unreadable_fleet_makes_the_fleet_checks_unhealthy(
        self, fake_redis: fakeredis.FakeRedis
    ) -> None:
        ctx = HealthContext(
            policy=fake_redis,
            broker=fake_redis,
            snapshot=FleetSnapshot.unreadable("ConnectionError: refused", 1.0),
            backlog_threshold=5,
            heartbeat_ttl=30.0,
        )
        found = {r.check: r for r in run_checks(ctx)}
        assert found["redis"].status == "healthy", "PING does not need the snapshot"
        for check in ("queue_backlog", "breakers", "workers", "degradation"):
            assert found[check].status == "unhealthy"
            assert "fleet state unreadable: ConnectionError: refused" in found[check].message


class TestStoredResults:
    """Results follow the HEALTH RESULTS CONTRACT and replace the previous run whole."""

    def test_contract_round_trip_and_replacement(self, fake_redis: fakeredis.FakeRedis) -> None:
        first = run_checks(context(fake_redis))
        store_results(fake_redis, first, 123.5)
        raw = json.loads(fake_redis.hget(HEALTH_RESULTS_KEY, "redis"))  # type: ignore[arg-type]
        assert set(raw) == {"check", "status", "message", "latency_seconds", "checked_at"}
        assert float(fake_redis.get(HEALTH_LAST_RUN_KEY)) == 123.5  # type: ignore[arg-type]
        snap = read_fleet(fake_redis, fake_redis, QUEUES)
        assert (in_check_order(snap.health.values()), snap.health_last_run) == (first, 123.5)
        only = [
            HealthResult(
                check="x", status="degraded", message="m", latency_seconds=0.1, checked_at=1
            )
        ]
        store_results(fake_redis, only, 124.0)
        snap = read_fleet(fake_redis, fake_redis, QUEUES)
        assert (list(snap.health.values()), snap.health_last_run) == (only, 124.0)

    def test_an_unreadable_stored_result_is_unhealthy(
        self, fake_redis: fakeredis.FakeRedis
    ) -> None:
        fake_redis.hset(HEALTH_RESULTS_KEY, "redis", "not json")
        result = read_fleet(fake_redis, fake_redis, QUEUES).health["redis"]
        assert (result.status, result.message) == ("unhealthy", "unreadable stored result")

    def test_fleet_view_names_the_worst_status(self) -> None:
        rows = [
            HealthResult(
                check="a", status="healthy", message="ok", latency_seconds=0.001, checked_at=1
            ),
            HealthResult(
                check="b", status="unhealthy", message="down", latency_seconds=0.2, checked_at=1
            ),
        ]
        assert worst(rows) == "unhealthy" and worst(rows[:1]) == "healthy"
        text = render_health(rows, last_run=10.0, now=15.0)
        assert text.splitlines()[0] == "FLEET UNHEALTHY  (checked 5s ago)"
        assert "down" in text
        assert "no health results" in render_health([], None, 0.0)


class FakeHub:
    def __init__(self) -> None:
        self.on_tick: set = set()  # type: ignore[type-arg]

    def turn(self) -> None:
        for callback in self.on_tick:
            callback()


class TestWorkerProbe:
    """Liveness fails on a stalled loop while connected, never because the broker is away."""

    @pytest.fixture
    def consumer(self) -> SimpleNamespace:
        return SimpleNamespace(hub=FakeHub(), connection=object(), task_consumer=None)

    def test_stalled_loop_fails_liveness_only_while_connected(
        self, consumer: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        probe = WorkerProbe(consumer, stale_after=5.0)
        assert probe.liveness().status == 200
        now = time.monotonic()
        monkeypatch.setattr(time, "monotonic", lambda: now + 10)
        assert probe.liveness().status == 503
        consumer.connection = None  # reconnecting to the broker: the loop cannot turn
        assert probe.liveness().status == 200
        consumer.connection = object()
        consumer.hub.turn()
        assert probe.liveness().status == 200
