"""Degradation levels: shared store suite, the state machine against a model, fallbacks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import events, keys
from policies.classify import FailureKind
from policies.clock import FakeClock
from policies.degradation import (
    AutoDegrade,
    Degradation,
    DegradationConfig,
    Level,
    list_services,
    pass_level,
)
from policies.degradation.store import (
    DegradationStore,
    MemoryDegradationStore,
    RedisDegradationStore,
)
from policies.errors import PolicyConfigError, ServiceDegraded

STEP = 10.0


@pytest.fixture(params=["memory", "fakeredis", "redis"])
def store(
    request: pytest.FixtureRequest, clock: FakeClock, fake_redis: fakeredis.FakeRedis
) -> Iterator[DegradationStore]:
    if request.param == "memory":
        yield MemoryDegradationStore(clock)
    elif request.param == "fakeredis":
        yield RedisDegradationStore(fake_redis, clock=clock)
    else:
        yield RedisDegradationStore(request.getfixturevalue("r"), clock=clock)


def service(store: DegradationStore, **options: Any) -> tuple[Degradation, events.Recorder]:
    recorder = events.Recorder()
    config = DegradationConfig(recovery_step=STEP, **options)
    return Degradation("payments", store, config, emitter=events.Emitter(recorder)), recorder


class TestDegradationSuite:
    """Operator sets, auto-degrade, stepwise recovery and measured outages, on every store."""

    def test_unknown_service_is_full(self, store: DegradationStore) -> None:
        d, _ = service(store)
        assert d.level() is Level.full
        assert d.snapshot().gen == 0

    def test_operator_set_is_exact_and_announced(self, store: DegradationStore) -> None:
        d, rec = service(store)
        state = d.set_level("offline", "maintenance")
        assert (state.level, state.from_level, state.source) == (
            Level.offline,
            Level.full,
            "operator",
        )
        d.set_level(Level.degraded)
        assert d.snapshot().level is Level.degraded
        changes = [(e.from_level, e.to_level) for e in rec.of(events.DegradationChanged)]  # type: ignore[attr-defined]
        assert changes == [("full", "offline"), ("offline", "degraded")]

    def test_auto_degrades_at_once(self, store: DegradationStore) -> None:
        d, _ = service(store)
        state = d.observe(breaker_open=True)
        assert state is not None and state.changed
        assert (state.from_level, state.level) == (Level.full, Level.degraded)
        assert d.level() is Level.degraded
        d.observe(breaker_open=True, failures=50)
        assert d.level() is Level.minimal
        d.observe(breaker_open=True)  # not healthier than needed: stays
        assert d.level() is Level.minimal

    def test_healthy_full_service_costs_nothing(self, store: DegradationStore) -> None:
        d, _ = service(store)
        assert d.observe() is None

    def test_recovers_one_step_per_recovery_step(
        self, store: DegradationStore, clock: FakeClock
    ) -> None:
        d, rec = service(store)
        d.observe(failures=100)  # minimal
        d.observe()  # healthy from now
        clock.advance(STEP - 1)
        d.observe()
        assert d.level() is Level.minimal
        clock.advance(1)
        d.observe()
        assert d.level() is Level.degraded
        clock.advance(STEP / 2)
        d.observe()
        assert d.level() is Level.degraded
        clock.advance(STEP / 2)
        d.observe()
        assert d.level() is Level.full
        recovered = rec.of(events.Recovered)
        assert len(recovered) == 1
        assert recovered[0].duration == pytest.approx(2 * STEP)  # type: ignore[attr-defined]

    def test_unhealthy_observation_restarts_the_stretch(
        self, store: DegradationStore, clock: FakeClock
    ) -> None:
        d, _ = service(store)
        d.observe(breaker_open=True)
        d.observe()
        clock.advance(STEP - 1)
        d.observe(breaker_open=True)
        clock.advance(1)
        d.observe()
        assert d.level() is Level.degraded
        clock.advance(STEP)
        d.observe()
        assert d.level() is Level.full

    def test_never_jumps_from_offline_to_full(
        self, store: DegradationStore, clock: FakeClock
    ) -> None:
        d, _ = service(store)
        d.observe(breaker_open=True)
        store.step("payments", "degrade", level=Level.offline)
        seen = []
        for _ in range(4):
            clock.advance(STEP * 10)
            d.observe()
            seen.append(d.snapshot().level)
        assert seen == [Level.offline, Level.minimal, Level.degraded, Level.full]

    def test_auto_recovery_stops_at_operator_level(
        self, store: DegradationStore, clock: FakeClock
    ) -> None:
        d, _ = service(store)
        d.set_level(Level.degraded, "planned")
        d.observe(failures=100)
        for _ in range(5):
            clock.advance(STEP)
            d.observe()
        assert d.snapshot().level is Level.degraded

    def test_recovery_time_is_measured_and_kept(
        self, store: DegradationStore, clock: FakeClock
    ) -> None:
        d, rec = service(store, history=2)
        for outage in (5.0, 7.0, 11.0):
            d.set_level("minimal")
            clock.advance(outage)
            d.set_level("full")
        state = d.snapshot()
        assert state.last_recovery == pytest.approx(11.0)
        assert state.recoveries == pytest.approx((11.0, 7.0))
        assert state.left_full_at is None
        assert [e.duration for e in rec.of(events.Recovered)] == pytest.approx([5.0, 7.0, 11.0])  # type: ignore[attr-defined]

    def test_down_for_while_degraded(self, store: DegradationStore, clock: FakeClock) -> None:
        d, _ = service(store)
        d.set_level("offline")
        clock.advance(3)
        d.set_level("degraded")
        clock.advance(4)
        assert d.snapshot().down_for == pytest.approx(7.0)

    def test_disabled_is_always_full(self, store: DegradationStore) -> None:
        d, _ = service(store, enabled=False)
        store.step("payments", "set", level=Level.offline)
        assert d.level() is Level.full
        assert d.observe(breaker_open=True) is None
        assert d.execute_with_fallback(lambda: 1).status == "executed"


def count_steps(store: Any) -> list[str]:
    """Record the op of every store step from now on (to count round trips)."""
    calls: list[str] = []
    original = store.step

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1])
        return original(*args, **kwargs)

    store.step = counting
    return calls


class TestLevelCache:
    """The level is read from the local cache, kept current by change messages."""

    def test_no_store_call_while_cached(self, clock: FakeClock) -> None:
        store = MemoryDegradationStore(clock)
        d, _ = service(store)
        other, _ = service(store)
        d.level()
        calls = count_steps(store)
        for _ in range(100):
            assert d.level() is Level.full
        assert calls == []
        other.set_level("minimal")
        assert d.level() is Level.minimal
        assert calls == ["set"]

    def test_lost_feed_drops_the_cache(self, clock: FakeClock) -> None:
        store = MemoryDegradationStore(clock)
        d, _ = service(store)
        d.level()
        store.seed("payments", Level.offline)  # a change whose message was lost
        d._on_change(None)
        assert d.level() is Level.offline


class TestOutage:
    """Redis unreachable: last known level, local changes, StoreUnavailable then StoreRestored."""

    def test_last_known_level_and_events(self) -> None:
        server = fakeredis.FakeServer()
        recorder = events.Recorder()
        d = Degradation(
            "payments",
            RedisDegradationStore(fakeredis.FakeRedis(server=server)),
            emitter=events.Emitter(recorder),
        )
        d._outage.probe_interval = 0.0
        d.set_level("degraded")
        server.connected = False
        d._on_change(None)
        assert d.level() is Level.degraded
        assert d.snapshot().source_store == "local"
        d.set_level("minimal", "local only")
        assert d.level() is Level.minimal
        assert len(recorder.of(events.StoreUnavailable)) == 1
        server.connected = True
        assert d.snapshot().level is Level.degraded  # Redis is the truth again
        assert len(recorder.of(events.StoreRestored)) == 1

    def test_unknown_level_without_redis_is_full(self) -> None:
        server = fakeredis.FakeServer()
        server.connected = False
        d = Degradation("payments", RedisDegradationStore(fakeredis.FakeRedis(server=server)))
        assert d.level() is Level.full


class TestExecuteWithFallback:
    """Outcomes: executed at full, degraded below, fallback, unavailable when offline."""

    @pytest.fixture
    def d(self, clock: FakeClock) -> Degradation:
        return Degradation("payments", MemoryDegradationStore(clock))

    def test_executed_at_full(self, d: Degradation) -> None:
        outcome = d.execute_with_fallback(lambda x, y=0: x + y, 1, y=2)
        assert (outcome.status, outcome.value, outcome.level, outcome.error) == (
            "executed", 3, Level.full, None
        )  # fmt: skip

    def test_degraded_runs_with_the_level(self, d: Degradation) -> None:
        d.adjust(pass_level())
        d.set_level("degraded")
        outcome = d.execute_with_fallback(lambda q, level: f"{q}@{level}", "search")
        assert (outcome.status, outcome.value) == ("degraded", "search@degraded")

    def test_adjuster_changes_arguments(self, d: Degradation) -> None:
        d.adjust(lambda level, a, kw: (a, {**kw, "limit": 5 if level else 50}))
        d.set_level("minimal")
        assert d.execute_with_fallback(lambda limit: limit).value == 5

    def test_offline_uses_generic_fallback_with_level(self, d: Degradation) -> None:
        @d.fallback()
        def cached(level: Level, key: str) -> str:
            return f"cached {key} ({level})"

        d.set_level("offline")
        outcome = d.execute_with_fallback(lambda key: 1 / 0, "k")
        assert (outcome.status, outcome.value) == ("fallback", "cached k (offline)")

    def test_level_specific_fallback_replaces_the_call(self, d: Degradation) -> None:
        d.register_fallback(lambda level: "static", level="minimal")
        d.set_level("minimal")
        assert d.execute_with_fallback(lambda: "live").value == "static"
        d.set_level("degraded")
        assert d.execute_with_fallback(lambda: "live").status == "degraded"

    def test_offline_without_fallback_is_unavailable(self, d: Degradation) -> None:
        d.set_level("offline")
        ran: list[int] = []
        outcome = d.execute_with_fallback(ran.append, 1)
        assert outcome.status == "unavailable"
        assert isinstance(outcome.error, ServiceDegraded)
        assert ran == []

    def test_failure_kind_falls_back(self, d: Degradation) -> None:
        d.register_fallback(lambda level: "spare")
        error = ServiceDegraded("upstream", "offline", 1.0)

        def call() -> None:
            raise error

        outcome = d.execute_with_fallback(call)
        assert (outcome.status, outcome.value, outcome.error) == ("fallback", "spare", error)

    def test_other_failures_propagate(self, d: Degradation) -> None:
        d.register_fallback(lambda level: "spare")
        with pytest.raises(ValueError):
            d.execute_with_fallback(int, "x")

    def test_configured_kinds_fall_back(self, clock: FakeClock) -> None:
        kinds = frozenset({FailureKind.timeout})
        d = Degradation("p", MemoryDegradationStore(clock), DegradationConfig(fall_back_on=kinds))
        d.register_fallback(lambda level: "spare")

        def slow() -> None:
            raise TimeoutError

        assert d.execute_with_fallback(slow).status == "fallback"

    def test_no_fallback_for_full(self, d: Degradation) -> None:
        with pytest.raises(ValueError):
            d.register_fallback(lambda level: 0, Level.full)


class TestAutoDegradeRule:
    """The rule: breaker open -> at least degraded; failures over threshold -> minimal."""

    @pytest.mark.parametrize(
        ("breaker_open", "failures", "level"),
        [
            (False, 0, Level.full),
            (True, 0, Level.degraded),
            (False, 10, Level.minimal),
            (True, 10, Level.minimal),
            (False, 9, Level.full),
        ],
    )
    def test_default_rule(self, breaker_open: bool, failures: int, level: Level) -> None:
        got, why = AutoDegrade().assess(breaker_open=breaker_open, failures=failures)
        assert got is level
        if failures >= 10:
            assert str(failures) in why, why
        elif breaker_open:
            assert "breaker open" in why, why
        else:
            assert why == "healthy", why

    def test_configurable(self) -> None:
        rule = AutoDegrade(breaker_open_level=Level.offline, failure_level=Level.degraded)
        assert rule.assess(breaker_open=True, failures=99)[0] is Level.offline


class TestConfigAndLevels:
    """Levels parse by name or rank; invalid options name the field."""

    def test_parse(self) -> None:
        assert Level.parse("Minimal") is Level.minimal
        assert Level.parse(3) is Level.offline
        assert Level.full < Level.degraded < Level.minimal < Level.offline
        with pytest.raises(ValueError, match="full, degraded"):
            Level.parse("broken")

    @pytest.mark.parametrize(
        ("factory", "field"),
        [
            (lambda: DegradationConfig(recovery_step=-1), "recovery_step"),
            (lambda: DegradationConfig(run_up_to=Level.offline), "run_up_to"),
            (lambda: DegradationConfig(fall_back_on={"degraded"}), "fall_back_on"),
            (lambda: DegradationConfig(enabled="yes"), "enabled"),
            (lambda: AutoDegrade(failure_threshold=0), "failure_threshold"),
        ],
    )
    def test_invalid(self, factory: Any, field: str) -> None:
        with pytest.raises(PolicyConfigError, match=field):
            factory()


class TestListServices:
    """`bulwark status` lists every service with state in Redis."""

    def test_lists_snapshots(self, fake_redis: fakeredis.FakeRedis) -> None:
        for name, level in (("search", "degraded"), ("auth", "offline")):
            Degradation(name, RedisDegradationStore(fake_redis)).set_level(level)
        fake_redis.set(keys.key("breaker", "x", "state"), 1)
        listed = [(s.service, s.level) for s in list_services(fake_redis)]
        assert listed == [("auth", Level.offline), ("search", Level.degraded)]


# --- the state machine against a reference model

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(list(Level))),
        st.tuples(st.just("degrade"), st.sampled_from(list(Level))),
        st.tuples(st.just("recover"), st.just(Level.full)),
        st.tuples(st.just("wait"), st.integers(1, 25)),
    ),
    max_size=30,
)


class Model:
    """The spec, written plainly: what the level must be after each step."""

    def __init__(self) -> None:
        self.level, self.floor = Level.full, Level.full
        self.left_full: float | None = None
        self.healthy_from: float | None = None
        self.last_change: float | None = None

    def apply(self, op: str, level: Level, now: float) -> tuple[Level, float | None]:
        before = self.level
        if op == "set":
            self.level = self.floor = level
            self.healthy_from = None
        elif op == "degrade":
            self.level = max(self.level, level)
            self.healthy_from = None
        elif self.level <= self.floor:
            self.healthy_from = None
        else:
            if self.healthy_from is None:
                self.healthy_from = now
            since = max(self.healthy_from, self.last_change or self.healthy_from)
            if now - since >= STEP:
                self.level = Level(self.level - 1)
        recovered = None
        if self.level != before:
            self.last_change = now
            if before == Level.full:
                self.left_full = now
            if self.level == Level.full:
                assert self.left_full is not None
                recovered, self.left_full = now - self.left_full, None
        return self.level, recovered


class TestStateMachineProperties:
    """Any sequence of steps: sets exact, recovery one step up, outage = time since leaving full."""

    @settings(max_examples=150, deadline=None)
    @given(ops=OPS)
    def test_stores_follow_the_model(self, ops: list[tuple[str, Any]]) -> None:
        clock = FakeClock()
        stores = [
            MemoryDegradationStore(clock),
            RedisDegradationStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()), clock=clock),
        ]
        model = Model()
        for op, arg in ops:
            if op == "wait":
                clock.advance(arg)
                continue
            want, recovered = model.apply(op, arg, clock())
            for store in stores:
                before = store.step("s", "snapshot").level
                state = store.step("s", op, level=arg, recovery_step=STEP)
                assert state.level is want, (op, arg, type(store).__name__)
                if op == "set":
                    assert state.level is arg
                if op == "recover":
                    assert before - state.level in (0, 1)
                if recovered is None:
                    assert state.recovered is None
                else:
                    assert state.recovered == pytest.approx(recovered)
