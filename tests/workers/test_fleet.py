"""`read_fleet`: one snapshot of the whole fleet, in three round trips, on a real redis-server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from policies import keys
from policies.breaker import BreakerConfig, CircuitBreaker, RedisBreakerStore
from policies.bulkhead import Bulkhead, BulkheadConfig
from policies.clock import FakeClock
from policies.deadletter import DeadLetter, DeadLetterStore
from policies.degradation import Degradation, DegradationConfig
from policies.degradation.store import RedisDegradationStore
from policies.index import NameIndex
from workers.fleet import (
    WORKERS_INDEX,
    PoolState,
    heartbeat_key,
    priority_queues,
    read_fleet,
)
from workers.lifecycle import beat_once
from workers.ops.status import render_status

pytestmark = pytest.mark.integration

QUEUES = ["payments", "default"]


class Counting(redis.Connection):
    """Counts what is sent: one `send_packed_command` is one round trip."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        Counting.sent += 1
        super().send_packed_command(command, check_health)


@pytest.fixture
def counted(r: redis.Redis, redis_url: str) -> Iterator[redis.Redis]:
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=Counting)
    client = redis.Redis(connection_pool=pool)
    client.ping()  # connect (and its handshake) before counting
    yield client
    client.close()


def populate(r: redis.Redis, *, breakers: int = 3, bulkheads: int = 2, services: int = 2) -> None:
    for i in range(breakers):
        CircuitBreaker(f"b{i}", BreakerConfig(), RedisBreakerStore(r)).force_open()
    for i in range(bulkheads):
        Bulkhead(f"h{i}", r, BulkheadConfig(limit=3)).try_acquire(renew=False)
    for i in range(services):
        Degradation(f"s{i}", RedisDegradationStore(r), DegradationConfig()).set_level("minimal")


def unacked_entry(queue: str, eta: datetime | None) -> str:
    headers = {"id": "x", "task": "t", "eta": eta.isoformat() if eta else None}
    return json.dumps([{"headers": headers, "body": ""}, "bulwark", queue])


class TestSnapshot:
    """Everything the fleet holds, read as plain immutable data."""

    def test_every_part_of_the_fleet(self, r: redis.Redis) -> None:
        populate(r)
        beat_once("w1@h", ["payments"], ttl=30)
        for sub in priority_queues("payments"):
            r.rpush(sub, "m")
        now = datetime.now(UTC)
        r.hset(
            "unacked",
            mapping={
                "tag1": unacked_entry("payments", now + timedelta(minutes=5)),
                "tag2": unacked_entry("payments", now - timedelta(minutes=5)),
                "tag3": unacked_entry("default", None),
                "tag4": "not json",
            },
        )
        DeadLetterStore(r).add(DeadLetter(task_name="t", reason="r"))
        r.hset(
            keys.key("health", "fleet", "results"),
            "redis",
            json.dumps(
                {"status": "healthy", "message": "m", "latency_seconds": 0.1, "checked_at": 1}
            ),
        )
        r.set(keys.key("health", "fleet", "last_run"), "5.0")

        snap = read_fleet(r, r, QUEUES)

        assert snap.up and snap.error is None
        payments = snap.queue("payments")
        assert payments.ready == len(priority_queues("payments")) == sum(payments.by_priority)
        assert (payments.unacked, payments.scheduled) == (2, 1), "only the future ETA is held"
        assert (snap.queue("default").unacked, snap.queue("default").scheduled) == (1, 0)
        assert [b.name for b in snap.breakers] == ["b0", "b1", "b2"]
        assert {b.state for b in snap.breakers} == {"forced_open"}
        assert [(b.name, b.in_use, b.limit) for b in snap.bulkheads] == [("h0", 1, 3), ("h1", 1, 3)]
        assert [(s.service, str(s.level)) for s in snap.services] == [
            ("s0", "minimal"),
            ("s1", "minimal"),
        ]
        assert [(w.hostname, w.queues) for w in snap.workers] == [("w1@h", ("payments",))]
        assert (snap.deadletters_kept, snap.deadletters_total) == (1, 1)
        assert snap.health["redis"].latency_seconds == 0.1 and snap.health_last_run == 5.0
        assert abs(snap.taken_at - float(r.time()[0])) < 5, "Redis TIME"
        data = json.loads(json.dumps(snap.as_dict()))  # JSON-ready
        assert data["queues"][0] == {
            "name": "payments",
            "ready": len(priority_queues("payments")),
            "unacked": 2,
            "scheduled": 1,
            "by_priority": list(payments.by_priority),
        }
        assert [s["level"] for s in data["services"]] == ["minimal", "minimal"]
        assert data["deadletters"] == {"kept": 1, "total": 1}
        with pytest.raises(AttributeError):
            snap.up = False  # type: ignore[misc]

    def test_a_dead_worker_is_dropped_from_the_index(self, r: redis.Redis) -> None:
        beat_once("alive@h", ["default"], ttl=30)
        r.sadd(WORKERS_INDEX, "dead@h")  # its heartbeat expired long ago
        snap = read_fleet(r, r, QUEUES)
        assert [w.hostname for w in snap.workers] == ["alive@h"]
        assert r.smembers(WORKERS_INDEX) == {b"alive@h"}

    def test_an_unreadable_heartbeat_is_skipped(self, r: redis.Redis) -> None:
        r.sadd(WORKERS_INDEX, "odd@h")
        r.set(heartbeat_key("odd@h"), "{not json")
        assert read_fleet(r, r, QUEUES).workers == ()

    def test_a_heartbeat_carries_the_pool_and_status_shows_it(self, r: redis.Redis) -> None:
        pool = {"processes": 3, "desired": 4, "min": 1, "max": 6, "reason": "busy", "at": 1.0}
        beat = {"hostname": "auto@h", "pid": 1, "queues": ["payments"], "at": 1.0, "pool": pool}
        r.sadd(WORKERS_INDEX, "auto@h", "bad@h")
        r.set(heartbeat_key("auto@h"), json.dumps(beat))
        r.set(heartbeat_key("bad@h"), json.dumps({**beat, "pool": {"processes": "many"}}))
        snap = read_fleet(r, r, QUEUES)
        found = {w.hostname: w.pool for w in snap.workers}
        assert found["auto@h"] == PoolState(**pool)  # type: ignore[arg-type]
        assert found["bad@h"] is None  # an unreadable pool part is dropped, not the worker
        shown = render_status(snap)
        assert "3 (1-6)" in shown and "-> 4: busy" in shown

    def test_unreachable_redis_gives_an_unreadable_snapshot(self, r: redis.Redis) -> None:
        gone = redis.Redis(port=1, socket_connect_timeout=0.5, retry=None)
        snap = read_fleet(gone, gone, QUEUES)
        assert not snap.up
        assert snap.error is not None and snap.error.startswith("ConnectionError: ")
        assert abs(snap.taken_at - time.time()) < 5, "when the read failed, by this clock"
        assert snap.queues == snap.breakers == snap.workers == ()


class TestRoundTrips:
    """The read is bounded: the same three round trips for 1 or 60 policy instances."""

    @pytest.mark.parametrize("size", [1, 20])
    def test_three_round_trips_whatever_the_size(
        self, r: redis.Redis, counted: redis.Redis, size: int
    ) -> None:
        populate(r, breakers=size, bulkheads=size, services=size)
        for i in range(size):
            beat_once(f"w{i}@h", ["default"], ttl=30)
        read_fleet(counted, counted, QUEUES)  # scripts loaded once per client
        before = Counting.sent
        snap = read_fleet(counted, counted, QUEUES)
        assert len(snap.breakers) == len(snap.workers) == size
        assert Counting.sent - before == 3


class TestNameIndex:
    """Stores list their instances in a set; a Redis that lost it learns the names again."""

    def test_flushed_index_is_refreshed_after_the_interval(self, r: redis.Redis) -> None:
        clock = FakeClock()
        index = NameIndex(r, "breaker", refresh=10.0, clock=clock)
        index.add("pay")
        r.flushall()
        index.add("pay")
        assert index.names() == [], "not due yet: no round trip"
        clock.advance(10.0)
        index.add("pay")
        assert index.names() == ["pay"]

    def test_a_breaker_known_only_through_its_pipelined_records_is_listed(
        self, r: redis.Redis
    ) -> None:
        store = RedisBreakerStore(r)
        store.index.refresh = 0.0  # due on every call
        breaker = CircuitBreaker("pay", BreakerConfig(), store)
        permit = breaker.acquire()
        r.delete(keys.index("breaker"))  # as if Redis had restarted empty
        pipe = r.pipeline(transaction=False)
        pending = breaker.record_in(pipe, permit, True, 0.01)
        pending.settle(pipe.execute(raise_on_error=False))
        assert [b.name for b in read_fleet(r, r, QUEUES).breakers] == ["pay"]
