"""The guard's decisions, in process, on a real redis-server: what is deferred, retried,
answered by a fallback or dead-lettered, and what is given back when nothing ran."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery.exceptions import Retry
from hypothesis import given
from hypothesis import strategies as st

from policies import events
from policies.breaker import BreakerConfig, CircuitBreaker, RedisBreakerStore
from policies.budget import BudgetConfig, RedisBudgetStore, RetryBudget
from policies.bulkhead import Bulkhead, BulkheadConfig
from policies.degradation import Degradation, DegradationConfig
from policies.degradation.store import RedisDegradationStore
from policies.errors import Interrupted, ServiceDegraded
from policies.once import ExecuteOnce
from policies.retry import RetryPolicy
from tests.kit import poll
from workers.guard import ATTEMPT_HEADER, DEFERRALS_HEADER, Guard, jittered

pytestmark = pytest.mark.integration


@dataclass
class Request:
    id: str = "t-1"
    called_directly: bool = False
    headers: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeTask:
    """A task as the guard sees it; records reschedules and dead letters instead of sending."""

    body: Callable[..., Any]
    name: str = "pay.charge"
    fallback: Callable[..., Any] | None = None
    request: Request = field(default_factory=Request)
    breaker: str | None = None
    bulkhead: str | None = None
    service: str | None = None
    budget: str | None = None
    defer_max: int | None = None
    once: bool = False
    rescheduled: list[tuple[float, str, bool]] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self.body(*args, **kwargs)

    def header(self, name: str, default: int = 0) -> int:
        return int(self.request.headers.get(name, default))

    def reschedule(self, countdown: float, *, reason: str, deferral: bool) -> Retry:
        self.rescheduled.append((countdown, reason, deferral))
        return Retry(reason, None, when=countdown)

    def dead_letter(self, reason: str, error: BaseException | None = None) -> None:
        self.dead.append(reason)


def guard(r: redis.Redis, **parts: Any) -> Guard:
    values: dict[str, Any] = {
        "breaker": None,
        "bulkhead": None,
        "service": None,
        "budget": None,
        "retry": RetryPolicy.from_settings(base_delay=0.1, max_delay=1.0),
        "defer_max": 5,
        "defer_cap": 60.0,
        "client": r,
    }
    return Guard(**{**values, **parts})


@pytest.fixture
def seen() -> Iterator[list[events.Event]]:
    found: list[events.Event] = []
    events.default_emitter.subscribe(found.append)
    yield found
    events.default_emitter.unsubscribe(found.append)


def service(r: redis.Redis, level: str) -> Degradation:
    s = Degradation("pay", RedisDegradationStore(r), DegradationConfig(recovery_step=7.0))
    s.set_level(level)
    return s


class TestServiceRefuses:
    """A level that refuses the call defers it, unless the task has a fallback."""

    def test_no_fallback_defers_without_calling(
        self, r: redis.Redis, seen: list[events.Event]
    ) -> None:
        calls: list[int] = []
        task = FakeTask(body=lambda: calls.append(1))
        with pytest.raises(Retry):
            guard(r, service=service(r, "offline")).run(task, (), {})
        assert calls == []
        ((countdown, reason, deferral),) = task.rescheduled
        assert deferral is True
        assert 7.0 <= countdown <= 7.0 + 0.7, "the recovery step, plus at most 10 % of jitter"
        assert "service at level offline" in reason
        (deferred,) = [e for e in seen if isinstance(e, events.TaskDeferred)]
        assert deferred.policy == "degradation" and deferred.deferrals == 1

    def test_with_a_fallback_answers_from_it(self, r: redis.Redis) -> None:
        task = FakeTask(body=lambda x: 1 / 0, fallback=lambda x: f"later {x}")
        assert guard(r, service=service(r, "offline")).run(task, ("a",), {}) == "later a"
        assert task.rescheduled == []


class TestFailures:
    """A failure is classified; its kind decides fallback, retry or dead letter."""

    def test_a_degraded_failure_is_answered_by_the_fallback(self, r: redis.Redis) -> None:
        def body() -> None:
            raise ServiceDegraded("pay", "minimal", 3.0)

        task = FakeTask(body=body, fallback=lambda: "from fallback")
        assert guard(r, service=service(r, "full")).run(task, (), {}) == "from fallback"
        assert task.rescheduled == [] and task.dead == []

    def test_a_transient_failure_is_retried_with_a_countdown(self, r: redis.Redis) -> None:
        def body() -> None:
            raise ConnectionError("gateway down")

        task = FakeTask(body=body)
        with pytest.raises(Retry):
            guard(r).run(task, (), {})
        ((countdown, _reason, deferral),) = task.rescheduled
        assert deferral is False and 0 < countdown <= 1.0

    def test_retries_stop_at_the_attempt_limit(self, r: redis.Redis) -> None:
        def body() -> None:
            raise ConnectionError("gateway down")

        task = FakeTask(body=body, request=Request(headers={ATTEMPT_HEADER: 3}))
        with pytest.raises(ConnectionError):
            guard(r).run(task, (), {})
        assert task.rescheduled == []
        assert len(task.dead) == 1

    def test_an_exhausted_retry_budget_defers_instead_of_retrying(
        self, r: redis.Redis, seen: list[events.Event]
    ) -> None:
        def body() -> None:
            raise ConnectionError("gateway down")

        budget = RetryBudget(
            "pay", BudgetConfig(ratio=0.0, min_retries=0), store=RedisBudgetStore(r)
        )
        task = FakeTask(body=body)
        with pytest.raises(Retry):
            guard(r, budget=budget).run(task, (), {})
        ((_countdown, reason, deferral),) = task.rescheduled
        assert deferral is True, "a deferral, not a retry: the budget said no"
        assert "retry-budget 'pay'" in reason
        assert not [e for e in seen if isinstance(e, events.TaskRetried)]


class TestGivingBack:
    """A bulkhead refusal gives the half-open trial slot back: nothing ran, nothing booked."""

    def test_trial_slot_returns_when_the_bulkhead_is_full(self, r: redis.Redis) -> None:
        config = BreakerConfig(open_timeout=0.05, max_open_timeout=0.05, success_threshold=1)
        breaker = CircuitBreaker("pay", config, RedisBreakerStore(r))
        for _ in range(5):
            permit = breaker.acquire()
            breaker.record(permit, success=False)
        assert breaker.snapshot().state == "open"
        full = Bulkhead("pay", r, BulkheadConfig(limit=1))
        holder = full.try_acquire(renew=False)
        bulkhead = Bulkhead("pay", r, BulkheadConfig(limit=1))
        task = FakeTask(body=lambda: "ran")
        poll(lambda: breaker.snapshot().retry_after == 0.0, deadline=5, what="open timeout over")
        with pytest.raises(Retry):
            guard(r, breaker=breaker, bulkhead=bulkhead).run(task, (), {})
        snap = breaker.snapshot()
        assert (snap.state, snap.trials_in_flight) == ("half_open", 0), "the trial slot came back"
        holder.release()
        assert guard(r, breaker=breaker, bulkhead=bulkhead).run(task, (), {}) == "ran"
        assert breaker.snapshot().state == "closed"


class TestDeferralBudget:
    """Past `defer_max` deferrals the task is dead-lettered, not re-sent."""

    def test_the_last_deferral_dead_letters(self, r: redis.Redis) -> None:
        task = FakeTask(body=lambda: None, request=Request(headers={DEFERRALS_HEADER: 5}))
        with pytest.raises(ServiceDegraded):
            guard(r, service=service(r, "offline"), defer_max=5).run(task, (), {})
        assert task.rescheduled == []
        assert task.dead == [
            "deferred 5 times, still refused: degradation 'pay': service at level offline"
        ]

    def test_a_deferral_countdown_is_capped(self, r: redis.Redis) -> None:
        breaker = CircuitBreaker("pay", BreakerConfig(open_timeout=300.0), RedisBreakerStore(r))
        breaker.force_open()
        task = FakeTask(body=lambda: None)
        with pytest.raises(Retry):
            guard(r, breaker=breaker, defer_cap=2.5).run(task, (), {})
        ((countdown, _reason, deferral),) = task.rescheduled
        assert deferral and countdown == 2.5


class TestJitter:
    """Deferral countdowns spread by up to 10 % (at least 50 ms) and never pass the cap."""

    @given(
        seconds=st.floats(min_value=0.0, max_value=1e5, allow_nan=False),
        cap=st.floats(min_value=0.0, max_value=1e5, allow_nan=False),
    )
    def test_bounds(self, seconds: float, cap: float) -> None:
        value = jittered(seconds, cap)
        assert value <= cap
        assert value >= min(cap, seconds)
        assert value <= seconds + max(0.05, seconds * 0.1)

    def test_it_spreads(self) -> None:
        assert len({jittered(10.0, 60.0) for _ in range(50)}) > 40


class TestExecuteOnce:
    """A task declared `once` runs at most once per task id, fleet-wide."""

    @staticmethod
    def once_guard(r: redis.Redis, **parts: Any) -> Guard:
        return guard(r, once=ExecuteOnce(r), once_window=10.0, **parts)

    def test_a_second_delivery_returns_the_first_result(self, r: redis.Redis) -> None:
        calls: list[int] = []
        body = lambda: calls.append(1) or {"receipt": len(calls)}  # noqa: E731
        first, second = FakeTask(body=body, once=True), FakeTask(body=body, once=True)
        assert self.once_guard(r).run(first, (), {}) == {"receipt": 1}
        assert self.once_guard(r).run(second, (), {}) == {"receipt": 1}
        assert calls == [1], "the body ran once"

    def test_a_result_that_is_not_json_still_settles(self, r: redis.Redis) -> None:
        bulkhead = Bulkhead("pay", r, BulkheadConfig(limit=1))
        odd = {(1, 2): "receipt"}
        assert (
            self.once_guard(r, bulkhead=bulkhead).run(FakeTask(body=lambda: odd, once=True), (), {})
            == odd
        )
        assert bulkhead.snapshot().in_use == 0, "the lease was released"
        again = FakeTask(body=lambda: pytest.fail("must not run"), once=True)
        assert self.once_guard(r).run(again, (), {}) == repr(odd), "kept as its repr"

    def test_called_directly_runs_without_a_claim(self, r: redis.Redis) -> None:
        task = FakeTask(
            body=lambda: "direct", once=True, request=Request(id=None, called_directly=True)
        )  # type: ignore[arg-type]
        assert self.once_guard(r).run(task, (), {}) == "direct"

    def test_a_failed_body_may_run_again(self, r: redis.Redis) -> None:
        outcomes = iter([ConnectionError("down"), "ok"])

        def body() -> str:
            outcome = next(outcomes)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        with pytest.raises(Retry):
            self.once_guard(r).run(FakeTask(body=body, once=True), (), {})
        assert self.once_guard(r).run(FakeTask(body=body, once=True), (), {}) == "ok"

    def test_failed_for_good_is_not_run_by_a_late_duplicate(self, r: redis.Redis) -> None:
        calls: list[int] = []

        def bad_input() -> None:
            calls.append(1)
            raise ValueError("amount must be positive")

        first = FakeTask(body=bad_input, once=True)
        with pytest.raises(ValueError):
            self.once_guard(r).run(first, (), {})
        assert len(first.dead) == 1, "a permanent failure is dead-lettered"
        duplicate = FakeTask(body=bad_input, once=True)  # the same task id, delivered again
        with pytest.raises(Interrupted, match=r"failed already \(permanent failure: ValueError"):
            self.once_guard(r).run(duplicate, (), {})
        assert calls == [1] and duplicate.dead == [], "not run, not dead-lettered twice"
        replay = FakeTask(body=lambda: "ran", once=True, request=Request(id="t-2"))
        assert self.once_guard(r).run(replay, (), {}) == "ran", "a replay is a new task id"

    def test_refused_before_the_body_leaves_no_claim(self, r: redis.Redis) -> None:
        full = Bulkhead("pay", r, BulkheadConfig(limit=1))
        holder = full.try_acquire(renew=False)
        with pytest.raises(Retry):
            self.once_guard(r, bulkhead=full).run(FakeTask(body=lambda: "x", once=True), (), {})
        holder.release()
        assert (
            self.once_guard(r, bulkhead=full).run(FakeTask(body=lambda: "ran", once=True), (), {})
            == "ran"
        )

    def test_running_elsewhere_defers_then_interrupted_dead_letters(self, r: redis.Redis) -> None:
        ExecuteOnce(r).begin("t-1", owner="other:1")  # a delivery that never finishes
        task = FakeTask(body=lambda: pytest.fail("must not run"), once=True)
        with pytest.raises(Retry):
            self.once_guard(r).run(task, (), {})
        ((countdown, reason, deferral),) = task.rescheduled
        assert deferral and 0 < countdown <= 11.0 and "running on other:1" in reason
        later = FakeTask(body=lambda: pytest.fail("must not run"), once=True)
        with pytest.raises(Interrupted):
            guard(r, once=ExecuteOnce(r), once_window=0.0).run(later, (), {})
        (letter,) = later.dead
        assert letter.startswith("interrupted: a delivery began on other:1")

    def test_an_unreachable_store_defers(self, r: redis.Redis) -> None:
        gone = redis.Redis(port=1, socket_connect_timeout=0.2, retry=None)
        task = FakeTask(body=lambda: pytest.fail("must not run"), once=True)
        with pytest.raises(Retry):
            guard(r, once=ExecuteOnce(gone)).run(task, (), {})
        ((_countdown, reason, deferral),) = task.rescheduled
        assert deferral and "execute-once store unreachable" in reason
