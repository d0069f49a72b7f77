"""The fleet-wide circuit breaker.

policy   `CircuitBreaker`: acquire and record around a call, local cache, outage fallback
config   `BreakerConfig` and the trip rules (`consecutive_failures`, `failure_rate`)
store    the store protocol, `BreakerSnapshot`, the Redis store (lua/breaker_step.lua)
memory   the in-memory store: unit tests, and the local fallback during a Redis outage
"""

from policies.breaker.config import (
    BreakerConfig,
    TripRule,
    WindowStats,
    consecutive_failures,
    failure_rate,
)
from policies.breaker.memory import MemoryBreakerStore
from policies.breaker.policy import CircuitBreaker, PendingRecord
from policies.breaker.store import (
    BreakerSnapshot,
    BreakerStore,
    Permit,
    RedisBreakerStore,
    list_breakers,
)

__all__ = [
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerStore",
    "CircuitBreaker",
    "MemoryBreakerStore",
    "PendingRecord",
    "Permit",
    "RedisBreakerStore",
    "TripRule",
    "WindowStats",
    "consecutive_failures",
    "failure_rate",
    "list_breakers",
]
