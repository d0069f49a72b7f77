"""Per-process resources, built on first use (after fork), never at import.

Redis clients for the policies and the broker, the dead-letter store, and the
policy objects of the task catalogue: each built once per process from its
declaration (`workers.registry`) plus the settings' defaults. Also the
start-up check every process makes (`wait_for_redis`).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import redis

from policies.breaker import BreakerConfig, CircuitBreaker, RedisBreakerStore, consecutive_failures
from policies.budget import BudgetConfig, RedisBudgetStore, RetryBudget
from policies.bulkhead import Bulkhead, BulkheadConfig
from policies.deadletter import DeadLetterStore
from policies.degradation import Degradation, DegradationConfig
from policies.degradation.store import RedisDegradationStore
from workers.amqp import AmqpBroker
from workers.registry import Declaration, registry
from workers.secrets import hide_password
from workers.settings import get_settings
from workers.stores import connect

T = TypeVar("T")

__all__ = [
    "RedisUnavailable",
    "broker",
    "broker_redis",
    "deadletters",
    "forget",
    "policy",
    "policy_redis",
    "wait_for_redis",
]


# -- objects built once per process --------------------------------------------------------------


class PerProcess(Generic[T]):
    """Objects built once per key and process: a pool child builds its own after the fork
    (a Redis connection, a lock or a thread of the parent's would not serve it)."""

    def __init__(self) -> None:
        self._built: dict[tuple[Hashable, int], T] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The object of `key` in this process, built by `build()` the first time."""
        full = (key, os.getpid())
        found = self._built.get(full)
        if found is None:
            with self._lock:
                found = self._built.get(full)
                if found is None:
                    found = self._built[full] = build()
        return found

    def mine(self) -> list[T]:
        """The objects built in this process (a forked child's copies of its parent's are
        not: they are the parent's to use)."""
        pid = os.getpid()
        with self._lock:
            return [one for (_, built_in), one in self._built.items() if built_in == pid]

    def clear(self) -> None:
        """Drop every built object (tests that change settings)."""
        with self._lock:
            self._built.clear()


# -- Redis clients -------------------------------------------------------------------------------


@functools.cache
def _client(url: str, pid: int, master: str) -> redis.Redis:
    return connect(
        url,
        master=master,
        socket_connect_timeout=2.0,
        socket_timeout=2.0,
        health_check_interval=30,
    )


def policy_redis() -> redis.Redis:
    """The Redis client for policy state in this process (a new one after fork)."""
    settings = get_settings()
    return _client(settings.redis_url, os.getpid(), settings.sentinel_master)


def broker_redis() -> redis.Redis:
    """The Redis beside the broker: the broker itself when it is Redis (which may be another
    server than the policies'); the policy store when the broker is RabbitMQ. It keeps
    what must outlive a policy store outage: seen message ids, the demo's dependencies."""
    settings = get_settings()
    if settings.rabbitmq:
        return policy_redis()
    return _client(settings.broker, os.getpid(), settings.sentinel_master)


@functools.cache
def _amqp(url: str, pid: int) -> AmqpBroker:
    return AmqpBroker(url)


def broker() -> redis.Redis | AmqpBroker:
    """The broker, for its queue depths and health: a Redis client, or `AmqpBroker`."""
    settings = get_settings()
    if settings.rabbitmq:
        return _amqp(settings.broker, os.getpid())
    return broker_redis()


def deadletters() -> DeadLetterStore:
    return DeadLetterStore(policy_redis())


#: Seconds a process waits for Redis at start before it gives up with a clear error: with
#: Python's and Celery's own start-up, a bad REDIS_URL is reported within 10 s.
CONNECT_DEADLINE = 5.0


class RedisUnavailable(RuntimeError):
    """Redis could not be reached (or started) within the deadline."""


def wait_for_redis(
    url: str, deadline: float = CONNECT_DEADLINE, *, master: str = "mymaster"
) -> redis.Redis:
    """Return a client once `PING` answers; raise `RedisUnavailable` after `deadline` s.
    `master`: the master's name if `url` is a `sentinel://` one."""
    client = connect(url, master=master, socket_connect_timeout=1.0, socket_timeout=2.0, retry=None)
    end = time.monotonic() + deadline
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            client.ping()
            return client
        except redis.AuthenticationError as exc:
            client.close()
            raise RedisUnavailable(
                f"Redis at {hide_password(url)} refused the credentials: {exc}. "
                "Fix the user or password in the URL."
            ) from None
        except redis.ResponseError as exc:  # NOAUTH and the like: asking again will not help
            client.close()
            raise RedisUnavailable(f"Redis at {hide_password(url)} refused PING: {exc}") from None
        except redis.RedisError as exc:
            last = exc
            time.sleep(0.05)
    client.close()
    raise RedisUnavailable(
        f"cannot reach Redis at {hide_password(url)} within {deadline:g} s: "
        f"{str(last).rstrip('.')}. "
        "Start Redis there, fix REDIS_URL, or unset it to use an embedded redis-server."
    )


# -- policy objects of the catalogue --------------------------------------------------------------


def build_breaker(decl: Declaration) -> CircuitBreaker:
    r = get_settings().resilience
    options: dict[str, Any] = {
        "trip": consecutive_failures(r.breaker_failure_threshold),
        "open_timeout": r.breaker_timeout,
        "max_open_timeout": max(r.breaker_timeout, 300.0),
        "success_threshold": r.breaker_success_threshold,
        **decl.overrides,
    }
    config = BreakerConfig.from_mapping(options)
    return CircuitBreaker(decl.name, config, RedisBreakerStore(policy_redis()))


def build_bulkhead(decl: Declaration) -> Bulkhead:
    options = {"limit": get_settings().resilience.bulkhead_max_concurrent, **decl.overrides}
    return Bulkhead(decl.name, policy_redis(), BulkheadConfig.from_mapping(options))


def build_service(decl: Declaration) -> Degradation:
    r = get_settings().resilience
    options = {
        "enabled": r.degradation_enabled,
        "recovery_step": r.degradation_recovery_step,
        **decl.overrides,
    }
    return Degradation(
        decl.name, RedisDegradationStore(policy_redis()), DegradationConfig(**options)
    )


def build_budget(decl: Declaration) -> RetryBudget:
    r = get_settings().resilience
    options = {
        "ratio": r.retry_budget_ratio,
        "window": r.retry_budget_window,
        "min_retries": r.retry_budget_min,
        **decl.overrides,
    }
    return RetryBudget(decl.name, BudgetConfig(**options), store=RedisBudgetStore(policy_redis()))


BUILDERS: dict[str, Callable[[Declaration], Any]] = {
    "breaker": build_breaker,
    "bulkhead": build_bulkhead,
    "service": build_service,
    "budget": build_budget,
}


def policy(kind: str, name: str) -> Any:
    """The process-wide policy object of `kind` `name` (built on first use, after fork)."""
    return registry.build(kind, name, BUILDERS[kind])


def forget() -> None:
    """Drop cached clients and built policy objects (tests that point the settings elsewhere)."""
    _client.cache_clear()
    registry.forget_built()
