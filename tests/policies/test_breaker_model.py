"""Property tests: the breaker on every store behaves like a small reference model."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from policies import events
from policies.breaker import (
    BreakerConfig,
    BreakerStore,
    CircuitBreaker,
    MemoryBreakerStore,
    Permit,
    RedisBreakerStore,
    consecutive_failures,
    failure_rate,
)
from policies.clock import FakeClock
from policies.errors import CircuitOpen
from policies.watch import feed_for

StoreFactory = Callable[[FakeClock], BreakerStore]


@pytest.fixture(params=["memory", "redis"])
def store_factory(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """Memory store and the real redis-server (on the fake clock). Not fakeredis: its Lua
    is the same script, run twice as slowly, and the real server is here."""
    if request.param == "memory":
        yield MemoryBreakerStore
        return
    client = request.getfixturevalue("r")
    yield lambda clock: RedisBreakerStore(client, clock=clock)
    feed_for(client).close()  # before the client closes under its subscriber thread


@dataclass
class Model:
    """The reference: what the issue says a breaker does, as plainly as possible."""

    threshold: int
    rate: float
    window: float
    min_calls: int
    k: int
    ttl: float
    timeout: float
    multiplier: float
    max_timeout: float
    now: float = 1000.0
    mode: str = "normal"
    state: str = "closed"
    gen: int = 0
    streak: int = 0
    calls: list[tuple[float, bool]] = field(default_factory=list)
    trips: int = 0
    trips_in_a_row: int = 0
    until: float = 0.0
    trials: dict[int, float] = field(default_factory=dict)
    passed: int = 0
    transitions: int = 0

    def move(self, mode: str, state: str) -> None:
        self.mode, self.state, self.gen = mode, state, self.gen + 1
        self.transitions += 1

    def shown(self) -> str:
        return self.state if self.mode == "normal" else self.mode

    def window_counts(self) -> tuple[int, int]:
        width = self.window / 10
        live = [
            f for t, f in self.calls if math.floor(t / width) > math.floor(self.now / width) - 10
        ]
        return len(live), sum(live)

    def open(self) -> None:
        self.trips += 1
        self.trips_in_a_row += 1
        grown = self.timeout * self.multiplier ** (self.trips_in_a_row - 1)
        self.until = self.now + min(self.max_timeout, grown)
        self.trials, self.passed = {}, 0
        self.move(self.mode, "open")

    def close(self) -> None:
        self.streak = self.trips_in_a_row = self.passed = 0
        self.trials, self.calls = {}, []

    def acquire(self, pid: int) -> tuple[bool, bool, float]:
        """(admitted, trial, retry_after)."""
        if self.mode == "disabled":
            return True, False, 0.0
        if self.mode == "forced_open":
            return False, False, self.timeout
        enforce = self.mode != "metrics_only"
        if self.state == "open":
            if self.now < self.until:
                return not enforce, False, self.until - self.now
            self.trials, self.passed = {}, 0
            self.move(self.mode, "half_open")
        if self.state == "half_open":
            self.trials = {p: e for p, e in self.trials.items() if e > self.now}
            if self.passed + len(self.trials) < self.k:
                self.trials[pid] = self.now + self.ttl
                return True, True, 0.0
            return not enforce, False, min(self.trials.values()) - self.now
        return True, False, 0.0

    def record(self, pid: int, trial: bool, gen: int, failed: bool) -> None:
        if self.mode == "disabled":
            return
        if trial:
            held = self.trials.pop(pid, None) is not None
            if held and self.state == "half_open" and gen == self.gen:
                if failed:
                    self.open()
                else:
                    self.passed += 1
                    if self.passed >= self.k:
                        self.close()
                        self.move(self.mode, "closed")
        elif self.state == "closed":
            self.calls.append((self.now, failed))
            self.streak = self.streak + 1 if failed else 0
            calls, failures = self.window_counts()
            if (self.threshold and self.streak >= self.threshold) or (
                self.rate and calls >= self.min_calls and failures >= self.rate * calls
            ):
                self.open()

    def command(self, op: str) -> None:
        if op == "reset":
            self.close()
            self.until = 0.0
            self.move("normal", "closed")
            return
        mode = {"force_open": "forced_open", "disable": "disabled"}.get(op, op)
        if self.mode != mode:
            self.move(mode, self.state)


configs = st.fixed_dictionaries(
    {
        "threshold": st.sampled_from([0, 1, 2, 3]),
        "rate": st.sampled_from([0.0, 0.5]),
        "k": st.integers(1, 3),
        "ttl": st.sampled_from([2.0, 6.0]),
        "multiplier": st.sampled_from([1.0, 2.0]),
    }
).map(lambda c: {**c, "threshold": c["threshold"] or (0 if c["rate"] else 2)})


@st.composite
def step(draw: st.DrawFn) -> tuple[object, ...]:
    """Mostly calls and outcomes, some time steps, rarely an operator command."""
    kind = draw(st.integers(0, 39))
    if kind == 0:
        return (
            "command",
            draw(st.sampled_from(["reset", "force_open", "disable", "metrics_only"])),
        )
    if kind < 12:
        return ("acquire", draw(st.integers(1, 3)))
    if kind < 30:
        return (
            "finish",
            draw(st.integers(0, 9)),
            draw(st.sampled_from(["ok", "fail", "fail", "slow"])),
        )
    return ("advance", draw(st.sampled_from([0.25, 1.0, 2.0, 4.5, 9.0, 17.0])))


ops = st.lists(step(), min_size=20, max_size=80)


@dataclass
class Held:
    pid: int
    trial: bool
    gen: int
    #: Admitted while disabled: its outcome is not booked, even if the breaker is back on.
    unbooked: bool
    permit: Permit


def build(
    cfg: dict[str, float], store_factory: StoreFactory
) -> tuple[CircuitBreaker, Model, FakeClock]:
    clock = FakeClock()
    trip = consecutive_failures(int(cfg["threshold"])) if cfg["threshold"] else None
    if cfg["rate"]:
        rated = failure_rate(cfg["rate"], window=8.0, min_calls=4)
        trip = rated if trip is None else trip | rated
    assert trip is not None
    config = BreakerConfig(
        trip=trip,
        open_timeout=4.0,
        open_timeout_multiplier=cfg["multiplier"],
        max_open_timeout=16.0,
        success_threshold=int(cfg["k"]),
        trial_ttl=cfg["ttl"],
        slow_call_duration=1.0,
    )
    name = f"model-{uuid.uuid4().hex[:12]}"
    breaker = CircuitBreaker(
        name, config, store_factory(clock), emitter=events.Emitter(), clock=clock
    )
    model = Model(
        threshold=int(cfg["threshold"]), rate=cfg["rate"], window=trip.window, min_calls=4,
        k=int(cfg["k"]), ttl=cfg["ttl"], timeout=4.0, multiplier=cfg["multiplier"],
        max_timeout=16.0,
    )  # fmt: skip
    return breaker, model, clock


class TestBreakerMatchesModel:
    """Any run of calls, outcomes, time steps and operator commands gives the model's answers."""

    @settings(
        max_examples=120,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(cfg=configs, steps=ops)
    def test_same_answers_as_the_model(
        self, store_factory: StoreFactory, cfg: dict[str, float], steps: list[tuple]
    ) -> None:
        breaker, model, clock = build(cfg, store_factory)
        recorder = events.Recorder()
        breaker._emitter.subscribe(recorder)
        held: list[Held] = []
        next_pid = 0
        for step in steps:
            if step[0] == "acquire":
                for _ in range(step[1]):
                    next_pid += 1
                    admitted, trial, retry_after = model.acquire(next_pid)
                    try:
                        permit = breaker.acquire()
                    except CircuitOpen as exc:
                        assert not admitted, (step, model)
                        assert exc.retry_after == pytest.approx(retry_after)
                        continue
                    assert admitted, (step, model)
                    assert permit.trial == trial
                    held.append(Held(next_pid, trial, model.gen, model.mode == "disabled", permit))
            elif step[0] == "finish" and held:
                h = held.pop(step[1] % len(held))
                if not h.unbooked:
                    model.record(h.pid, h.trial, h.gen, failed=step[2] != "ok")
                duration = 2.0 if step[2] == "slow" else 0.0
                breaker.record(h.permit, success=step[2] != "fail", duration=duration)
            elif step[0] == "advance":
                clock.advance(step[1])
                model.now = clock.now
            elif step[0] == "command":
                model.command(step[1])
                breaker._command(step[1])
            snap = breaker.snapshot()
            event(f"saw {snap.state}, {snap.trips} trips")
            calls, failures = model.window_counts()
            assert (snap.state, snap.trips, snap.trial_successes) == (
                model.shown(),
                model.trips,
                model.passed,
            ), (step, model)
            if model.state == "closed":
                assert (snap.failures, snap.window_calls, snap.window_failures) == (
                    model.streak,
                    calls,
                    failures,
                )
            live = sum(1 for e in model.trials.values() if e > model.now)
            assert snap.trials_in_flight == live
        transitions = recorder.of(events.BreakerTransition)
        assert len(transitions) == model.transitions
