"""Retry strategies (built on tenacity's waits) and the per-kind RetryPolicy."""

from __future__ import annotations

import pytest

from policies import errors
from policies.classify import Classifier, FailureKind
from policies.retry import (
    ExponentialBackoff,
    FixedDelay,
    LinearBackoff,
    RetryPolicy,
)


class TestStrategies:
    """Defaults are the spec's; delays follow their formula, within caps and jitter bounds."""

    def test_spec_defaults(self) -> None:
        backoff = ExponentialBackoff()
        assert (backoff.max_attempts, backoff.base, backoff.cap) == (3, 0.1, 30.0)
        assert backoff.jitter is True

    def test_exponential_without_jitter_doubles_then_caps(self) -> None:
        backoff = ExponentialBackoff(jitter=False, base=0.1, cap=1.0)
        assert [backoff.delay(n) for n in (1, 2, 3, 4, 5, 50)] == pytest.approx(
            [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
        )

    @pytest.mark.parametrize("attempt", [1, 2, 5, 12, 40])
    def test_jitter_stays_within_bounds(self, attempt: int) -> None:
        backoff = ExponentialBackoff(base=0.1, cap=30.0)
        high = min(30.0, 0.1 * 2 ** (attempt - 1))
        delays = [backoff.delay(attempt) for _ in range(300)]
        assert all(0.0 <= d <= high for d in delays)
        assert len(set(delays)) > 1, "jitter must vary the delay"

    def test_fixed(self) -> None:
        assert [FixedDelay(interval=2.0).delay(n) for n in (1, 2, 9)] == [2.0, 2.0, 2.0]

    def test_linear_caps(self) -> None:
        linear = LinearBackoff(start=1.0, step=2.0, cap=6.0)
        assert [linear.delay(n) for n in (1, 2, 3, 4)] == [1.0, 3.0, 5.0, 6.0]

    def test_attempt_counts_from_one(self) -> None:
        with pytest.raises(ValueError):
            FixedDelay().delay(0)

    @pytest.mark.parametrize(
        ("factory", "field"),
        [
            (lambda: ExponentialBackoff(base=0), "base"),
            (lambda: ExponentialBackoff(cap=float("inf")), "cap"),
            (lambda: ExponentialBackoff(max_attempts=0), "max_attempts"),
            (lambda: FixedDelay(interval=-1), "interval"),
            (lambda: LinearBackoff(max_total=0), "max_total"),
            (lambda: ExponentialBackoff(jitter="yes"), "jitter"),
        ],
    )
    def test_invalid_config_names_the_field(self, factory: object, field: str) -> None:
        with pytest.raises(errors.PolicyConfigError, match=field):
            factory()  # type: ignore[operator]

    def test_unknown_option_rejected(self) -> None:
        with pytest.raises(TypeError):
            ExponentialBackoff(base_delay=1.0)  # type: ignore[call-arg]

    def test_frozen(self) -> None:
        with pytest.raises(AttributeError):
            FixedDelay().interval = 3.0  # type: ignore[misc]


class TestRetryPolicy:
    """decide() retries with a countdown, falls back, or dead-letters with the reason."""

    policy = RetryPolicy(transient=ExponentialBackoff(jitter=False), classifier=Classifier())

    def test_transient_retries_with_backoff(self) -> None:
        first = self.policy.decide(ConnectionResetError(), 1)
        second = self.policy.decide(ConnectionResetError(), 2)
        assert (first.action, first.countdown) == ("retry", pytest.approx(0.1))
        assert (second.action, second.countdown) == ("retry", pytest.approx(0.2))

    def test_retries_exhausted_after_max_attempts(self) -> None:
        decision = self.policy.decide(ConnectionResetError("reset"), 3)
        assert decision.action == "dead_letter"
        assert decision.countdown is None
        assert decision.reason.startswith("retries exhausted (3 attempts): ")
        assert "ConnectionResetError" in decision.reason

    def test_permanent_dead_letters_at_once(self) -> None:
        decision = self.policy.decide(ValueError("bad input"), 1)
        assert decision.action == "dead_letter"
        assert decision.classification.kind is FailureKind.permanent
        assert decision.reason.startswith("permanent failure:")

    def test_degraded_falls_back(self) -> None:
        decision = self.policy.decide(errors.ServiceDegraded("pay", "minimal", 0.0), 1)
        assert decision.action == "fallback"

    def test_rate_limited_honours_retry_after(self) -> None:
        decision = self.policy.decide(errors.TransientFailure("busy", retry_after=42.0), 1)
        assert (decision.action, decision.countdown) == ("retry", 42.0)
        assert decision.classification.kind is FailureKind.transient
        assert decision.classification.retry_after == 42.0
        assert "busy" in decision.reason

    def test_rate_limited_without_retry_after_uses_larger_base(self) -> None:
        exc = type("Throttled", (Exception,), {"status_code": 429})()
        policy = RetryPolicy.from_settings(base_delay=0.1)
        delays = [policy.decide(exc, 1).countdown for _ in range(200)]
        assert all(d is not None and 0.0 <= d <= 1.0 for d in delays)  # base 1.0: window [0, 1]
        assert max(d for d in delays if d is not None) > 0.5, "wider than the 0.1 s base"

    def test_total_time_cap(self) -> None:
        policy = RetryPolicy(transient=FixedDelay(interval=5.0, max_total=12.0, max_attempts=9))
        assert policy.decide(ConnectionError(), 2, elapsed=5.0).action == "retry"
        late = policy.decide(ConnectionError(), 3, elapsed=10.0)
        assert late.action == "dead_letter"
        assert late.reason.startswith("retry time exhausted")

    def test_timeout_uses_its_own_strategy(self) -> None:
        policy = RetryPolicy(timeout=FixedDelay(interval=7.0, max_attempts=2))
        assert policy.decide(TimeoutError(), 1).countdown == 7.0
        assert policy.decide(TimeoutError(), 2).action == "dead_letter"

    def test_from_settings_uses_fleet_values(self) -> None:
        policy = RetryPolicy.from_settings(max_attempts=5, base_delay=0.5, max_delay=4.0)
        strategy = policy.strategy(FailureKind.transient)
        assert isinstance(strategy, ExponentialBackoff)
        assert (strategy.max_attempts, strategy.base, strategy.cap) == (5, 0.5, 4.0)
        assert policy.strategy(FailureKind.permanent) is None

    def test_bad_strategy_rejected(self) -> None:
        with pytest.raises(errors.PolicyConfigError, match="transient"):
            RetryPolicy(transient=3)  # type: ignore[arg-type]

    def test_attempt_counts_from_one(self) -> None:
        with pytest.raises(ValueError):
            self.policy.decide(ConnectionError(), 0)
