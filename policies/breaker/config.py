"""Circuit breaker configuration: trip rules as data, and the validated config object.

Trip rules are evaluated inside the breaker's Lua script for the Redis store,
so they are plain data rather than arbitrary callables; they still compose
in the tenacity spirit: `consecutive_failures(5) | failure_rate(0.5, window=60, min_calls=10)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from policies.classify import FailureKind, default_classifier
from policies.errors import PolicyConfigError

#: What a dependency's failure looks like by default (see `BreakerConfig.record_on`).
DEPENDENCY_FAILURES = frozenset(
    {FailureKind.transient, FailureKind.timeout, FailureKind.rate_limited}
)

#: A sliding window is kept as this many buckets of `window / WINDOW_BUCKETS` seconds.
WINDOW_BUCKETS = 10

StoreErrorMode = Literal["fail_open", "fail_closed"]


def _fail(name: str, accepts: str, value: object) -> PolicyConfigError:
    return PolicyConfigError(f"breaker option {name}={value!r}: accepts {accepts}")


def _positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        raise _fail(name, "a finite number of seconds >= 0" if zero_ok else "a number > 0", value)


def _count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _fail(name, f"an integer >= {minimum}", value)


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowStats:
    """What a trip rule looks at: the consecutive failures and the window's counts."""

    consecutive: int
    calls: int
    failures: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TripRule:
    """When a closed breaker opens. A rule that is 0 is off; `|` trips on either."""

    consecutive: int = 0
    rate: float = 0.0
    window: float = 60.0
    min_calls: int = 10

    def __post_init__(self) -> None:
        _count("consecutive_failures", self.consecutive, 0)
        if not (isinstance(self.rate, int | float) and 0.0 <= self.rate <= 1.0):
            raise _fail("failure_rate", "a fraction between 0 (off) and 1", self.rate)
        _positive("failure_rate window", self.window)
        _count("failure_rate min_calls", self.min_calls, 1)

    def __or__(self, other: TripRule) -> TripRule:
        if (self.consecutive and other.consecutive) or (self.rate and other.rate):
            raise PolicyConfigError(
                "combine a consecutive-failure rule with a rate rule, once each"
            )
        rated = self if self.rate else other
        return TripRule(
            consecutive=self.consecutive or other.consecutive,
            rate=rated.rate,
            window=rated.window,
            min_calls=rated.min_calls,
        )

    def __call__(self, stats: WindowStats) -> str | None:
        """Why the breaker trips on these stats, or None (mirrors breaker_step.lua)."""
        if self.consecutive and stats.consecutive >= self.consecutive:
            return f"{stats.consecutive} consecutive failures"
        if (
            self.rate
            and stats.calls >= self.min_calls
            and stats.failures >= self.rate * stats.calls
        ):
            return f"failure rate {stats.failures}/{stats.calls} in {self.window:g} s"
        return None


def consecutive_failures(count: int = 5) -> TripRule:
    """Trip after `count` failures in a row."""
    return TripRule(consecutive=count)


def failure_rate(rate: float, *, window: float = 60.0, min_calls: int = 10) -> TripRule:
    """Trip when at least `rate` of the calls of the last `window` seconds failed (>= min_calls)."""
    if not rate:
        raise _fail("failure_rate", "a fraction > 0 and <= 1", rate)
    return TripRule(rate=rate, window=window, min_calls=min_calls)


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    """How one breaker trips, waits, probes and classifies failures."""

    trip: TripRule = field(default_factory=consecutive_failures)
    #: A call slower than this counts as a failure (None: duration is ignored).
    slow_call_duration: float | None = None
    open_timeout: float = 30.0
    #: Each further trip without closing multiplies the open timeout, up to the max.
    open_timeout_multiplier: float = 1.0
    max_open_timeout: float = 300.0
    #: K: half-open admits exactly K trial calls fleet-wide; all K must succeed to close.
    success_threshold: int = 3
    #: A trial slot is a lease: a holder that dies frees it after this long.
    trial_ttl: float = 30.0
    on_store_error: StoreErrorMode = "fail_open"
    #: While Redis is unreachable, try it again after this long.
    store_retry_interval: float = 1.0
    #: Exceptions that count as the dependency's failures. None (the default): those the
    #: failure classifier calls transient, timeout or rate-limited (HTTP 429 and 5xx
    #: included); a caller's bad input (TypeError, ValueError, HTTP 4xx) does not count.
    record_on: tuple[type[BaseException], ...] | None = None
    #: Exceptions that never count, whatever the rule above says.
    ignore: tuple[type[BaseException], ...] = ()
    #: The failure kinds that count when `record_on` is None.
    count_kinds: frozenset[FailureKind] = DEPENDENCY_FAILURES
    #: If given, decides alone whether an exception counts as a failure.
    counts: Callable[[BaseException], bool] | None = None
    #: Emit events.CallRecorded for every outcome (off: one event per call is a lot).
    report_calls: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.trip, TripRule):
            raise _fail("trip", "consecutive_failures(n) and/or failure_rate(...)", self.trip)
        if self.slow_call_duration is not None:
            _positive("slow_call_duration", self.slow_call_duration)
        _positive("open_timeout", self.open_timeout)
        _positive("max_open_timeout", self.max_open_timeout)
        if self.max_open_timeout < self.open_timeout:
            raise _fail("max_open_timeout", "a number >= open_timeout", self.max_open_timeout)
        if not (isinstance(self.open_timeout_multiplier, int | float)) or not (
            1.0 <= self.open_timeout_multiplier <= 100.0
        ):
            raise _fail(
                "open_timeout_multiplier", "a number from 1 to 100", self.open_timeout_multiplier
            )
        _count("success_threshold", self.success_threshold, 1)
        _positive("trial_ttl", self.trial_ttl)
        if self.on_store_error not in ("fail_open", "fail_closed"):
            raise _fail("on_store_error", "'fail_open' or 'fail_closed'", self.on_store_error)
        _positive("store_retry_interval", self.store_retry_interval)
        for name in ("record_on", "ignore"):
            value = getattr(self, name)
            if name == "record_on" and value is None:
                continue
            if not isinstance(value, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in value
            ):
                raise _fail(name, "a tuple of exception types", value)
        if not isinstance(self.count_kinds, frozenset) or not all(
            isinstance(k, FailureKind) for k in self.count_kinds
        ):
            raise _fail("count_kinds", "a frozenset of FailureKind", self.count_kinds)
        if self.counts is not None and not callable(self.counts):
            raise _fail("counts", "a callable exc -> bool", self.counts)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> BreakerConfig:
        """Build from plain options (settings, YAML); unknown names are refused.

        Besides the fields, flat trip options are accepted: failure_threshold (consecutive
        failures, 0 = off), failure_rate, rate_window, rate_min_calls.
        """
        flat = {"failure_threshold", "failure_rate", "rate_window", "rate_min_calls"}
        known = {f.name for f in fields(cls)} | flat
        unknown = sorted(set(options) - known)
        if unknown:
            raise PolicyConfigError(
                f"unknown breaker option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        chosen = {k: v for k, v in options.items() if k not in flat}
        if flat & set(options):
            if "trip" in options:
                raise PolicyConfigError("give either trip= or the flat failure_* options")
            rule = TripRule(consecutive=options.get("failure_threshold", 5))
            if options.get("failure_rate"):
                rule = rule | failure_rate(
                    options["failure_rate"],
                    window=options.get("rate_window", 60.0),
                    min_calls=options.get("rate_min_calls", 10),
                )
            chosen["trip"] = rule
        return cls(**chosen)

    def classify(self, exc: BaseException) -> bool:
        """True if `exc` counts as a failure of the dependency, not of its caller."""
        if self.counts is not None:
            return bool(self.counts(exc))
        if isinstance(exc, self.ignore):
            return False
        if self.record_on is not None:
            return isinstance(exc, self.record_on)
        return default_classifier.classify(exc).kind in self.count_kinds

    def failed(self, success: bool, duration: float) -> bool:
        """Whether an outcome counts as a failure (slow calls count when configured)."""
        slow = self.slow_call_duration is not None and duration > self.slow_call_duration
        return not success or slow

    def open_timeout_after(self, trips_in_a_row: int) -> float:
        """How long the breaker stays open after its n-th trip without closing."""
        grown = self.open_timeout * self.open_timeout_multiplier ** (trips_in_a_row - 1)
        return min(self.max_open_timeout, grown)

    def script_args(self) -> list[str]:
        """ARGV[4..12] of breaker_step.lua."""
        t = self.trip
        values = (t.consecutive, t.rate, t.window, t.min_calls, self.open_timeout)
        more = (self.open_timeout_multiplier, self.max_open_timeout, self.success_threshold)
        return [repr(v) for v in (*values, *more, self.trial_ttl)]
