"""Retry strategies and the per-kind retry policy. Nothing here sleeps.

A strategy is a small frozen object built on tenacity's wait functions:
`delay(attempt)` is the countdown before retry number `attempt` (1 = the
first retry), `max_attempts` counts every attempt, the first included, and
`max_total` caps the time from the first attempt to the last retry. In a
Celery task the countdown goes to `task.retry(countdown=...)`: the worker slot
is freed while the task waits in the broker.

`RetryPolicy.decide(exc, attempt)` classifies the failure and answers with a
frozen `Decision`: retry (with a countdown), fallback, or dead_letter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

import tenacity

from policies.classify import Classification, Classifier, FailureKind, default_classifier
from policies.errors import PolicyConfigError

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_DELAY = 0.1
DEFAULT_MAX_DELAY = 30.0
DEFAULT_MAX_TOTAL = 120.0


def require(owner: object, name: str, ok: bool, accepts: str) -> None:
    """Raise PolicyConfigError naming `owner.name` and what it accepts unless `ok`."""
    if not ok:
        value = getattr(owner, name, None)
        raise PolicyConfigError(f"{type(owner).__name__}.{name} = {value!r}: accepts {accepts}")


def require_seconds(owner: object, *names: str, zero: bool = False) -> None:
    """Each named field is a finite number of seconds (> 0, or >= 0 with `zero`)."""
    for name in names:
        value = getattr(owner, name)
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value >= 0 if zero else value > 0)
        )
        require(owner, name, ok, "seconds >= 0" if zero else "seconds > 0")


def require_int(owner: object, name: str, minimum: int) -> None:
    value = getattr(owner, name)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(owner, name, ok, f"an integer >= {minimum}")


class _State:
    """The part of tenacity's RetryCallState its wait functions read."""

    __slots__ = ("attempt_number",)

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


def _wait(wait: tenacity.wait.wait_base, attempt: int) -> float:
    if attempt < 1:
        raise ValueError(f"attempt counts retries from 1, got {attempt}")
    return float(wait(cast(tenacity.RetryCallState, _State(attempt))))


class Strategy(Protocol):
    """How long to wait before each retry, and how many attempts in all."""

    @property
    def max_attempts(self) -> int: ...

    @property
    def max_total(self) -> float: ...

    def delay(self, attempt: int) -> float:
        """Seconds before retry number `attempt` (1 = the first retry)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class _Limits:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    #: Cap on the time from the first attempt to the start of the last retry.
    max_total: float = DEFAULT_MAX_TOTAL

    def __post_init__(self) -> None:
        require_int(self, "max_attempts", 1)
        require_seconds(self, "max_total")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExponentialBackoff(_Limits):
    """base * 2**(attempt-1), capped; with full jitter (uniform in [0, that]) by default."""

    base: float = DEFAULT_BASE_DELAY
    cap: float = DEFAULT_MAX_DELAY
    jitter: bool = True

    def __post_init__(self) -> None:
        super(ExponentialBackoff, self).__post_init__()
        require_seconds(self, "base", "cap")
        require(self, "jitter", isinstance(self.jitter, bool), "True or False")

    def delay(self, attempt: int) -> float:
        kind = tenacity.wait_random_exponential if self.jitter else tenacity.wait_exponential
        return _wait(kind(multiplier=self.base, max=self.cap), attempt)


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedDelay(_Limits):
    """The same countdown before every retry."""

    interval: float = DEFAULT_BASE_DELAY

    def __post_init__(self) -> None:
        super(FixedDelay, self).__post_init__()
        require_seconds(self, "interval", zero=True)

    def delay(self, attempt: int) -> float:
        return _wait(tenacity.wait_fixed(self.interval), attempt)


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearBackoff(_Limits):
    """start + step * (attempt-1), capped."""

    start: float = DEFAULT_BASE_DELAY
    step: float = DEFAULT_BASE_DELAY
    cap: float = DEFAULT_MAX_DELAY

    def __post_init__(self) -> None:
        super(LinearBackoff, self).__post_init__()
        require_seconds(self, "start", "step", zero=True)
        require_seconds(self, "cap")

    def delay(self, attempt: int) -> float:
        wait = tenacity.wait_incrementing(start=self.start, increment=self.step, max=self.cap)
        return _wait(wait, attempt)


Action = Literal["retry", "dead_letter", "fallback"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What to do with a failed attempt."""

    action: Action
    #: Seconds to wait before the retry (action "retry" only).
    countdown: float | None
    classification: Classification
    reason: str


def _default_rate_limited() -> Strategy:
    return ExponentialBackoff(base=1.0, max_total=300.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Failure kind -> strategy; permanent failures dead-letter, degraded ones fall back.

    `rate_limited` honours the failure's Retry-After when it has one (even
    beyond `cap`, never beyond `max_total`), else backs off with its own,
    larger base.
    """

    transient: Strategy = field(default_factory=ExponentialBackoff)
    timeout: Strategy = field(default_factory=ExponentialBackoff)
    rate_limited: Strategy = field(default_factory=_default_rate_limited)
    classifier: Classifier = field(default=default_classifier, compare=False)

    def __post_init__(self) -> None:
        for name in ("transient", "timeout", "rate_limited"):
            value = getattr(self, name)
            ok = callable(getattr(value, "delay", None)) and hasattr(value, "max_attempts")
            require(self, name, ok, "a retry strategy (ExponentialBackoff, FixedDelay, ...)")
        require(self, "classifier", isinstance(self.classifier, Classifier), "a Classifier")

    @classmethod
    def from_settings(
        cls,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        classifier: Classifier = default_classifier,
    ) -> RetryPolicy:
        """The spec's policy with the fleet's retry settings (attempts, base, cap)."""
        backoff = ExponentialBackoff(max_attempts=max_attempts, base=base_delay, cap=max_delay)
        rate = ExponentialBackoff(
            max_attempts=max_attempts, base=base_delay * 10, cap=max_delay, max_total=300.0
        )
        return cls(transient=backoff, timeout=backoff, rate_limited=rate, classifier=classifier)

    def strategy(self, kind: FailureKind) -> Strategy | None:
        """The strategy retrying `kind`; None for kinds that are never retried."""
        return {
            FailureKind.transient: self.transient,
            FailureKind.timeout: self.timeout,
            FailureKind.rate_limited: self.rate_limited,
        }.get(kind)

    def decide(self, exc: BaseException, attempt: int, *, elapsed: float = 0.0) -> Decision:
        """Decide after attempt number `attempt` (1 = the first run) failed with `exc`.

        `elapsed` is the time since the first attempt started (for the total-time cap).
        """
        if attempt < 1:
            raise ValueError(f"attempt counts from 1 (the first run), got {attempt}")
        found = self.classifier.classify(exc)
        if found.kind is FailureKind.permanent:
            return Decision(
                action="dead_letter",
                countdown=None,
                classification=found,
                reason=f"permanent failure: {found.reason}",
            )
        if found.kind is FailureKind.degraded:
            return Decision(
                action="fallback",
                countdown=None,
                classification=found,
                reason=f"service degraded: {found.reason}",
            )
        strategy = self.strategy(found.kind)
        assert strategy is not None
        if attempt >= strategy.max_attempts:
            return Decision(
                action="dead_letter",
                countdown=None,
                classification=found,
                reason=f"retries exhausted ({strategy.max_attempts} attempts): {found.reason}",
            )
        after = found.retry_after
        countdown = after if after is not None else strategy.delay(attempt)
        if elapsed + countdown > strategy.max_total:
            return Decision(
                action="dead_letter",
                countdown=None,
                classification=found,
                reason=(
                    f"retry time exhausted ({elapsed:g} s spent, next wait {countdown:g} s, "
                    f"cap {strategy.max_total:g} s): {found.reason}"
                ),
            )
        return Decision(
            action="retry",
            countdown=countdown,
            classification=found,
            reason=f"retry {attempt} of {strategy.max_attempts - 1} in {countdown:.3f} s: "
            f"{found.reason}",
        )
