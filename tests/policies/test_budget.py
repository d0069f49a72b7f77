"""The retry budget: one shared suite against memory, fakeredis and the real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis

from policies import events
from policies.budget import (
    BOOK_EVERY,
    BudgetConfig,
    BudgetStore,
    MemoryBudgetStore,
    RedisBudgetStore,
    RetryBudget,
)
from policies.clock import FakeClock
from policies.errors import PolicyConfigError, RetryBudgetExhausted

CONFIG = BudgetConfig(ratio=0.2, window=60.0, min_retries=3, buckets=10)


@pytest.fixture(params=["memory", "fakeredis", "redis"])
def store(
    request: pytest.FixtureRequest, clock: FakeClock, fake_redis: fakeredis.FakeRedis
) -> Iterator[BudgetStore]:
    if request.param == "memory":
        yield MemoryBudgetStore(clock)
    elif request.param == "fakeredis":
        yield RedisBudgetStore(fake_redis, clock=clock)
    else:
        yield RedisBudgetStore(request.getfixturevalue("r"), clock=clock)


def budget(store: BudgetStore, config: BudgetConfig = CONFIG) -> RetryBudget:
    return RetryBudget("payments", config, store=store, emitter=events.Emitter())


def spend_all(b: RetryBudget, limit: int = 1000) -> int:
    granted = 0
    while b.try_spend():
        granted += 1
        assert granted < limit
    return granted


class TestBudgetSuite:
    """Retries stay within min_retries + ratio * calls over a sliding window, on every store."""

    def test_quiet_service_gets_min_retries(self, store: BudgetStore) -> None:
        assert spend_all(budget(store)) == 3

    def test_calls_buy_retries_at_ratio(self, store: BudgetStore) -> None:
        b = budget(store)
        b.record_call(50)
        for _ in range(50):
            b.record_call()
        assert spend_all(b) == 3 + 20
        state = b.snapshot()
        assert (state.calls, state.retries, state.granted) == (100, 23, False)

    def test_peek_spends_nothing(self, store: BudgetStore) -> None:
        b = budget(store)
        assert b.snapshot().granted
        assert b.snapshot().retries == 0
        assert spend_all(b) == 3

    def test_spent_retries_leave_with_the_window(
        self, store: BudgetStore, clock: FakeClock
    ) -> None:
        clock.now = 1_200.0  # a bucket boundary (width 6 s)
        b = budget(store)
        assert spend_all(b) == 3
        clock.advance(59.0)
        assert not b.try_spend()
        clock.advance(1.0)  # the first bucket leaves the window
        assert spend_all(b) == 3

    def test_old_calls_stop_buying_retries(self, store: BudgetStore, clock: FakeClock) -> None:
        b = budget(store)
        b.record_call(100)
        clock.advance(60.0)
        assert b.snapshot().calls == 0
        assert spend_all(b) == 3

    def test_retry_after_is_when_oldest_retry_leaves(
        self, store: BudgetStore, clock: FakeClock
    ) -> None:
        clock.now = 1_200.0  # a bucket boundary (width 6 s)
        b = budget(store)
        assert b.try_spend()
        clock.advance(13.0)
        assert spend_all(b) == 2
        state = b.spend()
        assert not state.granted
        assert state.retry_after == pytest.approx(60.0 - 13.0)

    def test_spend_or_raise(self, store: BudgetStore) -> None:
        b = budget(store)
        spend_all(b)
        with pytest.raises(RetryBudgetExhausted) as raised:
            b.spend_or_raise()
        assert raised.value.name == "payments"
        # Spent at t=1000 in the bucket [996, 1002): it leaves the 60 s window at 1056.
        assert raised.value.retry_after == pytest.approx(56.0)

    def test_budgets_are_separate(self, store: BudgetStore) -> None:
        a = RetryBudget("a", CONFIG, store=store)
        other = RetryBudget("b", CONFIG, store=store)
        spend_all(a)
        assert other.try_spend()


class TestRedisBudgetStore:
    """Redis specifics: server TIME, pipelines, pruning, expiry."""

    def test_server_time_is_used_without_a_clock(self, fake_redis: fakeredis.FakeRedis) -> None:
        b = budget(RedisBudgetStore(fake_redis))
        b.record_call(10)
        assert spend_all(b) == 5
        assert fake_redis.ttl("bulwark:{retry-budget:payments}:window") > 60

    def test_record_call_on_a_callers_pipeline(
        self, fake_redis: fakeredis.FakeRedis, clock: FakeClock
    ) -> None:
        b = budget(RedisBudgetStore(fake_redis, clock=clock))
        with fake_redis.pipeline() as pipe:
            pipe.incr("other")
            b.queue_record_call(pipe, 40)
            pipe.execute()
        assert b.snapshot().calls == 40

    def test_queued_record_survives_noscript(self, r: redis.Redis, clock: FakeClock) -> None:
        b = budget(RedisBudgetStore(r, clock=clock))

        def record_piped(count: int) -> list[Any]:
            with r.pipeline(transaction=False) as pipe:
                queued = b.queue_record_call(pipe, count)
                results = pipe.execute(raise_on_error=False)
            queued.reply(results)
            return results

        record_piped(10)  # the first queue of the script loads it
        r.config_resetstat()
        record_piped(10)
        assert "cmdstat_script|exists" not in r.info("commandstats")
        r.script_flush()  # as if the server restarted
        assert isinstance(record_piped(20)[0], redis.exceptions.NoScriptError)
        assert b.snapshot().calls == 40  # the NOSCRIPT entry ran again, directly

    def test_counted_calls_are_booked_once_a_second_and_before_a_spend(
        self, r: redis.Redis, clock: FakeClock
    ) -> None:
        store = RedisBudgetStore(r, clock=clock)
        b = RetryBudget("payments", CONFIG, store=store, emitter=events.Emitter(), clock=clock)
        other = budget(store)  # another process: sees only what was booked

        def count(times: int) -> int:
            queued = 0
            for _ in range(times):
                with r.pipeline(transaction=False) as pipe:
                    booking = b.count_call_in(pipe)
                    results = pipe.execute(raise_on_error=False)
                if booking is not None:
                    booking.settle(results)
                    queued += 1
            return queued

        assert count(10) == 1  # the first call is booked at once, the next nine wait
        assert other.snapshot().calls == 1
        clock.advance(BOOK_EVERY)
        assert count(5) == 1 and other.snapshot().calls == 1 + 9 + 1
        assert count(20) == 0
        assert b.snapshot().calls == 11 + 24  # its own reads book what it counted first
        assert other.snapshot().calls == 35

    def test_a_failed_booking_keeps_its_calls_locally(
        self, r: redis.Redis, clock: FakeClock
    ) -> None:
        b = RetryBudget("payments", CONFIG, store=RedisBudgetStore(r, clock=clock),
                        emitter=events.Emitter(), clock=clock)  # fmt: skip
        gone = redis.Redis(port=1, socket_connect_timeout=0.2, retry=None).pipeline()
        booking = b.count_call_in(gone)
        assert booking is not None
        with pytest.raises(redis.ConnectionError) as failed:
            gone.execute(raise_on_error=False)
        booking.settle(failed.value)
        assert b._outage.down
        assert b._local.spend("payments", CONFIG, peek=True).calls == 1
        assert b.count_call_in(r.pipeline()) is None, "while down: straight to the local window"
        assert b._local.spend("payments", CONFIG, peek=True).calls == 2

    def test_counting_without_redis_records_at_once(self, clock: FakeClock) -> None:
        b = budget(MemoryBudgetStore(clock))
        for _ in range(3):
            assert b.count_call_in(None) is None  # type: ignore[arg-type]
        assert b.snapshot().calls == 3

    def test_queue_needs_redis_store(self, clock: FakeClock) -> None:
        with pytest.raises(TypeError):
            budget(MemoryBudgetStore(clock)).queue_record_call(None)  # type: ignore[arg-type]

    def test_old_buckets_are_pruned(
        self, fake_redis: fakeredis.FakeRedis, clock: FakeClock
    ) -> None:
        b = budget(RedisBudgetStore(fake_redis, clock=clock))
        for _ in range(30):
            b.record_call()
            clock.advance(6.0)
        assert fake_redis.hlen("bulwark:{retry-budget:payments}:window") <= 11


class TestBudgetOutage:
    """With Redis down the budget runs locally, says so once, and says when Redis is back."""

    def test_local_fallback_and_events(self) -> None:
        server = fakeredis.FakeServer()
        recorder = events.Recorder()
        b = RetryBudget(
            "payments",
            CONFIG,
            store=RedisBudgetStore(fakeredis.FakeRedis(server=server)),
            emitter=events.Emitter(recorder),
        )
        b._outage.probe_interval = 0.0
        server.connected = False
        b.record_call(10)
        assert spend_all(b) == 5  # the local window: 3 + 0.2 * 10
        assert len(recorder.of(events.StoreUnavailable)) == 1
        server.connected = True
        assert b.try_spend()
        assert len(recorder.of(events.StoreRestored)) == 1
        assert b.snapshot().source == "redis"

    def test_probes_are_spaced_during_an_outage(self) -> None:
        server = fakeredis.FakeServer()
        b = RetryBudget("p", CONFIG, store=RedisBudgetStore(fakeredis.FakeRedis(server=server)))
        server.connected = False
        b.try_spend()
        server.connected = True
        assert b.snapshot().source == "memory"  # not probed again within 1 s


class TestBudgetConfig:
    """Invalid options name the field; defaults are ratio 0.2 over 60 s."""

    def test_defaults(self) -> None:
        config = BudgetConfig()
        assert (config.ratio, config.window, config.width) == (0.2, 60.0, 6.0)

    @pytest.mark.parametrize(
        ("options", "field"),
        [
            ({"ratio": -0.1}, "ratio"),
            ({"ratio": float("nan")}, "ratio"),
            ({"window": 0}, "window"),
            ({"min_retries": -1}, "min_retries"),
            ({"buckets": 0}, "buckets"),
            ({"buckets": 10_000}, "buckets"),
        ],
    )
    def test_invalid(self, options: dict[str, float], field: str) -> None:
        with pytest.raises(PolicyConfigError, match=field):
            BudgetConfig(**options)  # type: ignore[arg-type]
