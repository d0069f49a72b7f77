"""The circuit breaker: one suite on the memory, fakeredis and redis-server stores."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from policies import events
from policies.breaker import (
    BreakerConfig,
    CircuitBreaker,
    MemoryBreakerStore,
    RedisBreakerStore,
    consecutive_failures,
    failure_rate,
    list_breakers,
)
from policies.clock import FakeClock
from policies.errors import CircuitOpen, PolicyConfigError
from policies.watch import feed_for
from tests.kit import poll
from workers.ops.embedded import EmbeddedRedis

Make = Callable[..., CircuitBreaker]


@pytest.fixture(params=["memory", "fakeredis", "redis"])
def make(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[Make]:
    """Build breakers on one store kind; Redis stores run on the fake clock (time override)."""
    client: Any = None
    if request.param != "memory":
        client = request.getfixturevalue("fake_redis" if request.param == "fakeredis" else "r")
    recorder = events.Recorder()

    def build(**options: Any) -> CircuitBreaker:
        store = (
            MemoryBreakerStore(clock) if client is None else RedisBreakerStore(client, clock=clock)
        )
        name = f"b-{uuid.uuid4().hex[:10]}"
        breaker = CircuitBreaker(
            name, BreakerConfig(**options), store, emitter=events.Emitter(recorder), clock=clock
        )
        breaker.recorder = recorder  # type: ignore[attr-defined]
        return breaker

    yield build
    if client is not None:
        feed_for(client).close()


def fail(breaker: CircuitBreaker, times: int = 1, *, duration: float = 0.0) -> None:
    for _ in range(times):
        breaker.record(breaker.acquire(), success=False, duration=duration)


def succeed(breaker: CircuitBreaker, times: int = 1, *, duration: float = 0.0) -> None:
    for _ in range(times):
        breaker.record(breaker.acquire(), success=True, duration=duration)


def transitions(breaker: CircuitBreaker) -> list[tuple[str, str]]:
    recorder: events.Recorder = breaker.recorder  # type: ignore[attr-defined]
    return [
        (e.from_state, e.to_state)
        for e in recorder.of(events.BreakerTransition)
        if isinstance(e, events.BreakerTransition) and e.name == breaker.name
    ]


class TestConfig:
    """Config is frozen, validated, and trip rules compose with `|`."""

    def test_rules_combine(self) -> None:
        rule = consecutive_failures(3) | failure_rate(0.5, window=10, min_calls=4)
        assert (rule.consecutive, rule.rate, rule.window, rule.min_calls) == (3, 0.5, 10, 4)
        with pytest.raises(PolicyConfigError, match="once each"):
            _ = consecutive_failures(3) | consecutive_failures(4)

    @pytest.mark.parametrize(
        ("options", "field"),
        [
            ({"open_timeout": 0}, "open_timeout"),
            ({"success_threshold": 0}, "success_threshold"),
            ({"on_store_error": "maybe"}, "on_store_error"),
            ({"open_timeout": 10, "max_open_timeout": 5}, "max_open_timeout"),
            ({"record_on": [ValueError]}, "record_on"),
            ({"trial_ttl": -1}, "trial_ttl"),
        ],
    )
    def test_bad_values_name_the_field(self, options: dict[str, Any], field: str) -> None:
        with pytest.raises(PolicyConfigError, match=field):
            BreakerConfig(**options)

    def test_unknown_options_are_refused(self) -> None:
        with pytest.raises(PolicyConfigError, match=r"unknown breaker option.*treshold"):
            BreakerConfig.from_mapping({"treshold": 5})

    def test_flat_options_build_the_trip_rule(self) -> None:
        config = BreakerConfig.from_mapping(
            {"failure_threshold": 7, "failure_rate": 0.25, "rate_window": 30, "open_timeout": 5}
        )
        assert config.trip == consecutive_failures(7) | failure_rate(0.25, window=30)
        assert config.open_timeout == 5

    def test_classify(self) -> None:
        config = BreakerConfig(record_on=(OSError,), ignore=(FileNotFoundError,))
        assert config.classify(ConnectionError())
        assert not config.classify(FileNotFoundError())
        assert not config.classify(ValueError())
        assert BreakerConfig(counts=lambda e: "boom" in str(e)).classify(ValueError("boom"))

    def test_by_default_only_the_dependencys_failures_count(self) -> None:
        def http(status: int) -> Exception:
            return type("HTTPError", (Exception,), {"status_code": status})()

        config = BreakerConfig()
        for counted in (ConnectionError(), TimeoutError(), http(503), http(429), OSError("x")):
            assert config.classify(counted), counted
        for caller in (ValueError(), TypeError(), KeyError("k"), http(404), http(400)):
            assert not config.classify(caller), caller
        assert not BreakerConfig(ignore=(ConnectionError,)).classify(ConnectionError())
        assert BreakerConfig(record_on=(ValueError,)).classify(ValueError())
        assert not BreakerConfig(record_on=(ValueError,)).classify(ConnectionError())


class TestTripping:
    """A closed breaker opens on consecutive failures, a failure rate, or slow calls."""

    def test_consecutive_failures(self, make: Make) -> None:
        b = make(trip=consecutive_failures(3))
        fail(b, 2)
        succeed(b)
        fail(b, 2)
        assert b.snapshot().state == "closed"
        fail(b)
        snap = b.snapshot()
        assert (snap.state, snap.trips, snap.retry_after) == ("open", 1, 30.0)
        assert transitions(b) == [("closed", "open")]

    def test_failure_rate_needs_min_calls(self, make: Make, clock: FakeClock) -> None:
        b = make(trip=failure_rate(0.5, window=10, min_calls=6))
        for _ in range(2):
            fail(b)
            succeed(b)
        assert b.snapshot().state == "closed"
        succeed(b)
        fail(b)  # 3 of 6 failed
        assert b.snapshot().state == "open"

    def test_old_calls_leave_the_window(self, make: Make, clock: FakeClock) -> None:
        b = make(trip=failure_rate(0.5, window=10, min_calls=4))
        fail(b, 3)
        clock.advance(11)
        assert b.snapshot().window_calls == 0
        succeed(b, 3)
        fail(b)
        assert b.snapshot().state == "closed"

    def test_slow_calls_count(self, make: Make) -> None:
        b = make(trip=consecutive_failures(2), slow_call_duration=1.0)
        succeed(b, duration=5.0)
        succeed(b, duration=5.0)
        assert b.snapshot().state == "open"


class TestOpenAndHalfOpen:
    """Open refuses until the timeout; half-open admits exactly K trials; leases expire."""

    def test_open_refuses_with_retry_after(self, make: Make, clock: FakeClock) -> None:
        b = make(trip=consecutive_failures(1), open_timeout=10)
        fail(b)
        clock.advance(4)
        with pytest.raises(CircuitOpen) as caught:
            b.acquire()
        assert (caught.value.state, caught.value.retry_after) == ("open", 6.0)
        recorder: events.Recorder = b.recorder  # type: ignore[attr-defined]
        (rejected,) = recorder.of(events.CallRejected)
        assert (rejected.name, rejected.retry_after) == (b.name, 6.0)

    def test_exactly_k_trials_and_all_must_pass(self, make: Make, clock: FakeClock) -> None:
        b = make(trip=consecutive_failures(1), open_timeout=10, success_threshold=3, trial_ttl=5)
        fail(b)
        clock.advance(10)
        permits = [b.acquire() for _ in range(3)]
        assert all(p.trial for p in permits)
        with pytest.raises(CircuitOpen) as caught:
            b.acquire()
        assert (caught.value.state, caught.value.retry_after) == ("half_open", 5.0)
        for p in permits:
            b.record(p, success=True)
        assert b.snapshot().state == "closed"
        assert transitions(b) == [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ]

    def test_a_failed_trial_reopens_for_longer(self, make: Make, clock: FakeClock) -> None:
        b = make(
            trip=consecutive_failures(1),
            open_timeout=10,
            open_timeout_multiplier=2,
            max_open_timeout=25,
            success_threshold=2,
        )
        fail(b)
        for expected in (20.0, 25.0):
            clock.advance(30)
            first, second = b.acquire(), b.acquire()
            b.record(first, success=False)
            b.record(second, success=True)  # stale: the breaker already reopened
            snap = b.snapshot()
            assert (snap.state, snap.retry_after) == ("open", expected)
        assert b.snapshot().trips == 3

    def test_a_dead_holders_slot_frees_after_the_ttl(self, make: Make, clock: FakeClock) -> None:
        b = make(trip=consecutive_failures(1), open_timeout=1, success_threshold=1, trial_ttl=5)
        fail(b)
        clock.advance(1)
        lost = b.acquire()
        clock.advance(4.5)
        with pytest.raises(CircuitOpen):
            b.acquire()
        clock.advance(0.5)
        again = b.acquire()
        assert again.trial and b.snapshot().trials_in_flight == 1
        b.record(lost, success=True)  # too late: its lease expired
        assert b.snapshot().state == "half_open"
        b.record(again, success=True)
        assert b.snapshot().state == "closed"

    def test_released_trial_slot_books_nothing(self, make: Make, clock: FakeClock) -> None:
        b = make(trip=consecutive_failures(1), open_timeout=1, success_threshold=1)
        fail(b)
        clock.advance(1)
        b.release(b.acquire())  # e.g. the bulkhead refused: the call never ran
        snap = b.snapshot()
        assert (snap.state, snap.trials_in_flight, snap.trial_successes) == ("half_open", 0, 0)
        b.record(b.acquire(), success=True)
        assert b.snapshot().state == "closed"


class TestOperatorModes:
    """force_open, disable, metrics_only and reset do what operators expect."""

    def test_force_open_then_reset(self, make: Make) -> None:
        b = make()
        assert b.force_open() == "forced_open"
        with pytest.raises(CircuitOpen) as caught:
            b.acquire()
        assert caught.value.state == "forced_open"
        fail(make(), 1)  # another breaker is not affected
        assert b.reset() == "closed"
        succeed(b)
        assert transitions(b) == [("closed", "forced_open"), ("forced_open", "closed")]

    def test_disabled_admits_and_records_nothing(self, make: Make) -> None:
        b = make(trip=consecutive_failures(1))
        b.disable()
        fail(b, 5)
        snap = b.snapshot()
        assert (snap.state, snap.trips, snap.window_calls) == ("disabled", 0, 0)

    def test_metrics_only_never_refuses_but_reports(self, make: Make, clock: FakeClock) -> None:
        b = make(trip=consecutive_failures(2))
        b.metrics_only()
        fail(b, 2)
        snap = b.snapshot()
        assert (snap.state, snap.circuit, snap.trips) == ("metrics_only", "open", 1)
        permit = b.acquire()
        assert permit.would_reject
        recorder: events.Recorder = b.recorder  # type: ignore[attr-defined]
        rejected = [
            e for e in recorder.of(events.CallRejected) if isinstance(e, events.CallRejected)
        ]
        assert rejected and rejected[-1].reason.startswith("not enforced")
        reason = [e for e in recorder.of(events.BreakerTransition) if e.name == b.name][-1]
        assert isinstance(reason, events.BreakerTransition)
        assert reason.reason.startswith("metrics_only, not enforced")

    def test_reset_clears_counters(self, make: Make) -> None:
        b = make(trip=consecutive_failures(3))
        fail(b, 2)
        b.reset()
        fail(b, 2)
        snap = b.snapshot()
        assert (snap.state, snap.failures, snap.window_calls) == ("closed", 2, 2)


class TestGuard:
    """guard(), call() and the decorator book outcomes through classify()."""

    def test_counted_and_ignored_errors(self, make: Make) -> None:
        b = make(trip=consecutive_failures(2), ignore=(KeyError,))

        def boom(exc: Exception) -> None:
            raise exc

        guarded = b(boom)
        for exc in (KeyError("x"), KeyError("y"), KeyError("z")):
            with pytest.raises(KeyError):
                guarded(exc)
        assert b.snapshot().state == "closed"
        for _ in range(2):
            with pytest.raises(OSError):
                b.call(boom, OSError("down"))
        with pytest.raises(CircuitOpen):
            b.call(lambda: "never")

    def test_result_passes_through(self, make: Make) -> None:
        b = make()
        assert b.call(lambda x: x * 2, 21) == 42
        assert b.snapshot().window_calls == 1


class TestRedisOnly:
    """The Redis store: cached admits, pub/sub invalidation, pipelines, listing."""

    def test_closed_admits_from_cache_and_learns_of_changes(self, r: redis.Redis) -> None:
        name = f"c-{uuid.uuid4().hex[:8]}"
        store = RedisBreakerStore(r)
        here = CircuitBreaker(name, BreakerConfig(), store, emitter=events.Emitter())
        other_client = redis.Redis.from_url(_url(r))  # another process, as far as Redis knows
        elsewhere = CircuitBreaker(
            name, BreakerConfig(), RedisBreakerStore(other_client), emitter=events.Emitter()
        )
        here.record(here.acquire())
        poll(lambda: feed_for(r).healthy, deadline=5, what="change feed subscribed")
        here.record(here.acquire())  # a reply while the feed is healthy fills the cache
        calls = _count_calls(store)
        for _ in range(20):
            assert here.acquire().source == "cache"
        assert calls["acquire"] == 0
        elsewhere.force_open()

        def refused() -> bool:
            try:
                here.acquire()
            except CircuitOpen:
                return True
            return False

        poll(refused, deadline=5, what="the other breaker's change reaches this one")
        before = calls["acquire"]
        with pytest.raises(CircuitOpen):
            here.acquire()
        assert calls["acquire"] == before  # refused from the cache, no round trip

    def test_round_trips_per_call(self, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        name = f"rt-{uuid.uuid4().hex[:8]}"
        b = CircuitBreaker(
            name,
            BreakerConfig(trip=consecutive_failures(1), open_timeout=0.2, success_threshold=1),
            RedisBreakerStore(r),
            emitter=events.Emitter(),
        )
        b.record(b.acquire())
        poll(lambda: feed_for(r).healthy, deadline=5, what="change feed subscribed")
        b.record(b.acquire())
        sent: list[object] = []
        real = r.execute_command

        def counting(*args: Any, **kwargs: Any) -> Any:
            sent.append(args[0])
            return real(*args, **kwargs)

        monkeypatch.setattr(r, "execute_command", counting)
        permit = b.acquire()
        assert sent == []  # closed and the feed is healthy: admitted locally
        b.record(permit, success=False)
        assert len(sent) == 1  # one script call books it (and trips the breaker)
        with pytest.raises(CircuitOpen):
            b.acquire()
        assert len(sent) == 1  # open with time left: refused locally
        trial = poll(lambda: _admitted(b), deadline=5, what="half-open")
        assert trial.trial
        sent.clear()
        b.record(trial, success=True)
        assert len(sent) == 1

    def test_record_in_a_callers_pipeline(self, r: redis.Redis) -> None:
        name = f"p-{uuid.uuid4().hex[:8]}"
        b = CircuitBreaker(name, BreakerConfig(trip=consecutive_failures(1)), RedisBreakerStore(r))
        permit = b.acquire()
        with r.pipeline(transaction=False) as pipe:
            pipe.set(f"other-{name}", 1)
            pending = b.record_in(pipe, permit, success=False)
            replies = pipe.execute(raise_on_error=False)
        pending.settle(replies)
        assert b.snapshot().state == "open"
        with pytest.raises(CircuitOpen):
            b.acquire()

    def test_pipelined_record_sends_no_script_exists_and_survives_noscript(
        self, spare_redis: EmbeddedRedis
    ) -> None:
        # A server of its own: on the session's, another client's EVAL of the same script
        # (a test's leftover thread or worker) can load it again between the flush and
        # the pipelined EVALSHA, and the NOSCRIPT path would not be taken (seen once).
        r = redis.Redis.from_url(spare_redis.url)
        recorder = events.Recorder()
        config = BreakerConfig(trip=consecutive_failures(2))
        b = CircuitBreaker(
            f"ns-{uuid.uuid4().hex[:8]}",
            config,
            RedisBreakerStore(r),
            emitter=events.Emitter(recorder),
        )

        def record_piped(success: bool, *, flush_first: bool = False) -> list[Any]:
            permit = b.acquire()  # may run the script (and load it) if its state is stale
            if flush_first:
                r.script_flush()  # as if the server restarted
            with r.pipeline(transaction=False) as pipe:
                pending = b.record_in(pipe, permit, success=success)
                replies = pipe.execute(raise_on_error=False)
            pending.settle(replies)
            return replies

        record_piped(False)  # the first queue of the script loads it
        r.config_resetstat()
        record_piped(False)
        assert "cmdstat_script|exists" not in r.info("commandstats")
        assert b.snapshot().state == "open"
        b.reset()
        record_piped(False)
        replies = record_piped(False, flush_first=True)
        assert isinstance(replies[0], redis.exceptions.NoScriptError)
        assert b.snapshot().state == "open"  # booked by the direct re-run, on the shared store
        assert not recorder.of(events.StoreUnavailable)

    def test_list_breakers(self, r: redis.Redis) -> None:
        names = sorted(f"l-{uuid.uuid4().hex[:8]}-{i}" for i in range(3))
        for name in names:
            b = CircuitBreaker(
                name, BreakerConfig(trip=consecutive_failures(1)), RedisBreakerStore(r)
            )
            fail(b)
        found = {s.name: s for s in list_breakers(r)}
        assert set(names) <= set(found)
        assert all(found[n].state == "open" and found[n].trips == 1 for n in names)


def _admitted(breaker: CircuitBreaker) -> Any:
    try:
        return breaker.acquire()
    except CircuitOpen:
        return None


def _url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def _count_calls(store: RedisBreakerStore) -> dict[str, int]:
    counts = {"acquire": 0}
    real = store.acquire

    def counting(*args: Any) -> Any:
        counts["acquire"] += 1
        return real(*args)

    store.acquire = counting  # type: ignore[method-assign]
    return counts
