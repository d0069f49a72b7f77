"""The bulkhead: one shared suite on the memory store, fakeredis and the real redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis

from policies import events
from policies.bulkhead import Bulkhead, BulkheadConfig, list_bulkheads
from policies.bulkhead.store import (
    HOLD_SAMPLE,
    BulkheadStore,
    MemoryBulkheadStore,
    RedisBulkheadStore,
)
from policies.clock import FakeClock
from policies.errors import BulkheadFull, PolicyConfigError
from policies.watch import feed_for
from tests.kit import poll

TTL = 0.3


@dataclass
class Backend:
    """A store plus a way to let time pass on it (fake clock, or real time on Redis)."""

    kind: str
    store: BulkheadStore
    clock: FakeClock | None = None
    client: redis.Redis | None = None

    def make(self, name: str = "db", **options: float) -> tuple[Bulkhead, events.Recorder]:
        recorder = events.Recorder()
        config = BulkheadConfig(**{"limit": 2, "lease_ttl": TTL, **options})  # type: ignore[arg-type]
        return Bulkhead(name, self.store, config, emitter=events.Emitter(recorder)), recorder

    def pass_time(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)  # real leases need real time to pass

    def lapse(self, check: Callable[[], object], ttl: float = TTL) -> None:
        """Let `ttl` pass, then `check()` must hold."""
        if self.clock is not None:
            self.clock.advance(ttl + 0.001)
            assert check()
        else:
            poll(check, deadline=ttl + 5, what="lease expiry")

    def feed_ready(self, bulkhead: Bulkhead) -> None:
        bulkhead._watch()
        if self.client is not None:
            assert feed_for(self.client).wait_healthy(5.0)


@pytest.fixture(params=["memory", "fakeredis", "redis"])
def backend(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[Backend]:
    if request.param == "memory":
        yield Backend("memory", MemoryBulkheadStore(clock), clock=clock)
        return
    client = request.getfixturevalue("fake_redis" if request.param == "fakeredis" else "r")
    yield Backend(request.param, RedisBulkheadStore(client), client=client)
    feed_for(client).close()  # before the client closes under its subscriber thread


def kinds(recorder: events.Recorder) -> list[str]:
    return [e.action for e in recorder.of(events.BulkheadChanged)]  # type: ignore[attr-defined]


class TestSharedSemantics:
    """Every store enforces the limit, frees on release and on expiry, and keeps renewed leases."""

    def test_limit_is_respected(self, backend: Backend) -> None:
        bulkhead, recorder = backend.make(limit=3)
        leases = [bulkhead.try_acquire(renew=False) for _ in range(3)]
        with pytest.raises(BulkheadFull) as full:
            bulkhead.try_acquire(renew=False)
        assert full.value.limit == 3
        assert 0 < full.value.retry_after <= TTL
        assert len({lease.holder for lease in leases}) == 3
        rejected = recorder.of(events.CallRejected)
        assert len(rejected) == 1 and rejected[0].name == "db"
        assert kinds(recorder) == ["acquired"] * 3

    def test_release_frees_a_permit(self, backend: Backend) -> None:
        bulkhead, recorder = backend.make(limit=1)
        first = bulkhead.try_acquire(renew=False)
        with pytest.raises(BulkheadFull):
            bulkhead.try_acquire(renew=False)
        assert first.release() is True
        with bulkhead.try_acquire(renew=False) as second:
            assert bulkhead.snapshot().holders == (second.holder,)
        assert second.released and bulkhead.snapshot().in_use == 0
        assert kinds(recorder) == ["acquired", "released", "acquired", "released"]

    def test_release_is_idempotent(self, backend: Backend) -> None:
        bulkhead, _ = backend.make(limit=3)
        kept, gone = bulkhead.try_acquire(renew=False), bulkhead.try_acquire(renew=False)
        assert gone.release() is True
        assert gone.release() is False
        assert bulkhead.release(gone) is False
        assert bulkhead.snapshot().holders == (kept.holder,)

    def test_expiry_frees_a_dead_holder(self, backend: Backend) -> None:
        bulkhead, _ = backend.make(limit=1)
        dead = bulkhead.try_acquire(renew=False)
        backend.lapse(lambda: bulkhead.snapshot().available == 1)
        taker = bulkhead.try_acquire(renew=False)
        assert dead.renew() is False and dead.lost
        assert dead.release() is False
        assert bulkhead.snapshot().holders == (taker.holder,)

    def test_renewal_keeps_a_live_holder(self, backend: Backend) -> None:
        bulkhead, recorder = backend.make(limit=1)
        live = bulkhead.try_acquire(renew=False)
        for _ in range(4):  # 4 x ttl/2: twice the TTL in all
            backend.pass_time(TTL / 2)
            assert live.renew() is True
        with pytest.raises(BulkheadFull):
            bulkhead.try_acquire(renew=False)
        assert not live.lost and bulkhead.snapshot().holders == (live.holder,)
        assert "lost" not in kinds(recorder)

    def test_snapshot_numbers(self, backend: Backend) -> None:
        bulkhead, _ = backend.make(limit=4)
        leases = [bulkhead.try_acquire(renew=False) for _ in range(3)]
        snap = bulkhead.snapshot()
        assert (snap.name, snap.limit, snap.in_use, snap.available) == ("db", 4, 3, 1)
        assert snap.utilization == pytest.approx(0.75)
        assert snap.holders == tuple(sorted(lease.holder for lease in leases))
        assert not snap.local

    def test_acquire_wakes_on_a_release(self, backend: Backend) -> None:
        # Long TTL and poll interval: only the release announcement can wake the waiter.
        bulkhead, _ = backend.make(limit=1, lease_ttl=60.0, poll_interval=60.0)
        holder = bulkhead.try_acquire(renew=False)
        backend.feed_ready(bulkhead)
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(bulkhead.acquire(max_wait=30.0)))
        waiter.start()
        poll(lambda: bulkhead._wakeup is not None and _waiting(bulkhead), what="waiter asleep")
        holder.release()
        waiter.join(20.0)
        assert not waiter.is_alive() and len(got) == 1
        assert bulkhead.snapshot().holders == (got[0].holder,)  # type: ignore[attr-defined]

    def test_acquire_gives_up_after_max_wait(self, backend: Backend) -> None:
        bulkhead, recorder = backend.make(limit=1, lease_ttl=60.0, poll_interval=0.05)
        bulkhead.try_acquire(renew=False)
        with pytest.raises(BulkheadFull) as full:
            bulkhead.acquire(max_wait=0.2)
        # No hold history: the holder's lease (60 s TTL) is the soonest a permit frees.
        assert 59.0 <= full.value.retry_after <= 60.0
        assert len(recorder.of(events.CallRejected)) == 1

    def test_list_bulkheads_shows_stored_limits(self, backend: Backend) -> None:
        if backend.client is None:
            assert backend.store.names() == []
            backend.make("a", limit=3)[0].try_acquire(renew=False)
            assert backend.store.names() == ["a"]
            return
        backend.make("a", limit=3)[0].try_acquire(renew=False)
        backend.make("b", limit=5)[0].try_acquire(renew=False).release()
        listed = {(s.name, s.limit, s.in_use) for s in list_bulkheads(backend.client)}
        assert listed == {("a", 3, 1), ("b", 5, 0)}


def _waiting(bulkhead: Bulkhead) -> bool:
    """True once some thread sleeps in the bulkhead's wake-up condition."""
    wakeup = bulkhead._wakeup
    return wakeup is not None and bool(wakeup._cond._waiters)  # type: ignore[attr-defined]


class TestRetryAfter:
    """retry_after: the earliest expiry, or sooner when the oldest holder nears the average hold."""

    def test_earliest_expiry_without_history(self, clock: FakeClock) -> None:
        bulkhead = Bulkhead("db", MemoryBulkheadStore(clock), BulkheadConfig(limit=1, lease_ttl=30))
        bulkhead.try_acquire(renew=False)
        clock.advance(10)
        with pytest.raises(BulkheadFull) as full:
            bulkhead.try_acquire(renew=False)
        assert full.value.retry_after == pytest.approx(20)

    def test_average_hold_time_caps_it(self, clock: FakeClock) -> None:
        bulkhead = Bulkhead("db", MemoryBulkheadStore(clock), BulkheadConfig(limit=1, lease_ttl=30))
        lease = bulkhead.try_acquire(renew=False)
        clock.advance(2)
        lease.release()  # average hold: 2 s
        bulkhead.try_acquire(renew=False)
        clock.advance(0.5)
        with pytest.raises(BulkheadFull) as full:
            bulkhead.try_acquire(renew=False)
        assert full.value.retry_after == pytest.approx(1.5)
        clock.advance(5)  # overdue: the floor applies
        with pytest.raises(BulkheadFull) as full:
            bulkhead.try_acquire(renew=False)
        assert full.value.retry_after == pytest.approx(bulkhead.config.min_retry_after)

    def test_redis_script_agrees(self, fake_redis: redis.Redis) -> None:
        bulkhead = Bulkhead("db", fake_redis, BulkheadConfig(limit=1, lease_ttl=30))
        fake_redis.hset("bulwark:{bulkhead:db}:meta", "avg_hold", "2.0")
        bulkhead.try_acquire(renew=False)
        with pytest.raises(BulkheadFull) as full:
            bulkhead.try_acquire(renew=False)
        assert 1.5 < full.value.retry_after <= 2.0


class TestWaiting:
    """A waiter retries at bounded intervals, never in a busy loop."""

    def test_attempts_are_bounded_by_poll_interval(self, clock: FakeClock) -> None:
        store = MemoryBulkheadStore(clock)
        calls = []
        acquire = store.acquire

        def counting(*args: object) -> object:
            calls.append(args)
            return acquire(*args)  # type: ignore[arg-type]

        store.acquire = counting  # type: ignore[method-assign, assignment]
        config = BulkheadConfig(limit=1, lease_ttl=60, poll_interval=0.1)
        bulkhead = Bulkhead("db", store, config, emitter=events.Emitter())
        bulkhead.try_acquire(renew=False)
        calls.clear()
        with pytest.raises(BulkheadFull):
            bulkhead.acquire(max_wait=0.5)
        assert 2 <= len(calls) <= 8


class TestBulkheadConfig:
    """Config is validated: each bad field is named, unknown options are refused."""

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("limit", 0),
            ("limit", 2.5),
            ("limit", True),
            ("lease_ttl", 0.0),
            ("lease_ttl", float("inf")),
            ("poll_interval", -1.0),
            ("min_retry_after", "1"),
            ("probe_interval", float("nan")),
        ],
    )
    def test_bad_values_name_the_field(self, field: str, value: object) -> None:
        with pytest.raises(PolicyConfigError, match=field):
            BulkheadConfig(**{field: value})  # type: ignore[arg-type]

    def test_unknown_options_are_refused(self) -> None:
        with pytest.raises(PolicyConfigError, match="max_concurrent"):
            BulkheadConfig.from_mapping({"limit": 3, "max_concurrent": 3})
        assert BulkheadConfig.from_mapping({"limit": 3}).limit == 3

    def test_bad_name_is_a_config_error(self) -> None:
        with pytest.raises(PolicyConfigError, match="name"):
            Bulkhead("bad name{", MemoryBulkheadStore())

    def test_config_is_frozen(self) -> None:
        config = BulkheadConfig()
        with pytest.raises(AttributeError):
            config.limit = 3  # type: ignore[misc]
        assert (config.limit, config.lease_ttl) == (10, 30.0)


class TestRedisLeases:
    """The Redis store's lazy upkeep: a short hot path, and dead leases still count for nothing."""

    LEASES = "bulwark:{bulkhead:db}:leases"

    def test_hot_path_is_three_commands_each_way(self, r: redis.Redis) -> None:
        bulkhead = Bulkhead("db", r, BulkheadConfig(limit=4, lease_ttl=30))
        bulkhead.try_acquire(renew=False).release()  # the first acquire does the upkeep
        r.config_resetstat()
        for _ in range(10):
            bulkhead.try_acquire(renew=False).release()
        stats = r.info("commandstats")
        inner = sum(
            v["calls"] for k, v in stats.items() if k not in ("cmdstat_evalsha", "cmdstat_eval")
        )
        assert stats["cmdstat_evalsha"]["calls"] == 20
        # TIME + ZCOUNT + ZADD, then TIME + ZSCORE + ZREM + ZCOUNT (and a sampled HGET/HSET)
        assert inner <= 10 * 7 + 2 * 2 + 1, stats  # + the CONFIG RESETSTAT itself

    def test_upkeep_stores_the_limit_and_sets_an_expiry(self, r: redis.Redis) -> None:
        lease = Bulkhead("db", r, BulkheadConfig(limit=4, lease_ttl=30)).try_acquire(renew=False)
        assert r.hget("bulwark:{bulkhead:db}:meta", "limit") == b"4"
        assert 60_000 < r.pttl(self.LEASES) <= 62_000  # 2 * (ttl + 1 s)
        lease.release()

    def test_dead_leases_count_for_nothing_and_go_when_full(self, r: redis.Redis) -> None:
        bulkhead = Bulkhead("db", r, BulkheadConfig(limit=1, lease_ttl=30))
        r.zadd(self.LEASES, {"crashed": 1.0})  # a lease that expired long ago
        lease = bulkhead.try_acquire(renew=False)
        assert bulkhead.snapshot().holders == (lease.holder,)
        r.zadd(self.LEASES, {"crashed-too": 1.0})
        with pytest.raises(BulkheadFull):
            bulkhead.try_acquire(renew=False)
        assert r.zrange(self.LEASES, 0, -1) == [lease.holder.encode()]  # purged when full
        assert lease.release() and not lease.release()

    def test_release_from_a_full_bulkhead_is_announced_and_timed(self, r: redis.Redis) -> None:
        store = RedisBulkheadStore(r)
        bulkhead = Bulkhead("db", store, BulkheadConfig(limit=2, lease_ttl=30))
        channel = "bulwark:{bulkhead:db}:events"
        with r.pubsub() as sub:
            sub.subscribe(channel)
            assert sub.get_message(timeout=5.0)["type"] == "subscribe"  # type: ignore[index]
            for _ in range(HOLD_SAMPLE - 1):  # the next release is not sampled
                next(store._releases)
            first, second = bulkhead.try_acquire(renew=False), bulkhead.try_acquire(renew=False)
            second.release()  # from full: announced, and its hold time is booked
            assert r.hget("bulwark:{bulkhead:db}:meta", "avg_hold") is not None
            first.release()  # not from full: silent
            r.publish(channel, "end")
            seen = []
            while not seen or seen[-1] != b"end":
                message = sub.get_message(timeout=5.0)
                assert message is not None, seen
                seen.append(message["data"])
        assert seen == [b"released", b"end"]


class TestLeaseExpiry:
    """Upkeep pushes the key's expiry on, when refused too, and never shortens it."""

    LEASES = "bulwark:{bulkhead:db}:leases"

    def test_a_refused_upkeep_still_pushes_the_expiry(self, r: redis.Redis) -> None:
        store = RedisBulkheadStore(r)
        assert store.acquire("db", "a", 1, 30.0).ok
        r.pexpire(self.LEASES, 5_000)  # as if the last push was long ago
        store._upkeep.clear()  # this process's upkeep is due
        assert not store.acquire("db", "b", 1, 30.0).ok
        assert r.pttl(self.LEASES) > 60_000

    def test_a_shorter_ttl_never_shortens_it(self, r: redis.Redis) -> None:
        long, short = RedisBulkheadStore(r), RedisBulkheadStore(r)
        assert long.acquire("db", "a", 4, 300.0).ok
        assert short.acquire("db", "b", 4, 1.0).ok
        assert short.renew("db", "b", 1.0).ok
        assert r.pttl(self.LEASES) > 600_000
