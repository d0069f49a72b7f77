"""Per-process clients built on first use (after fork), never at import."""

from __future__ import annotations

import functools
import os

import redis

from policies.deadletter import DeadLetterStore
from workers.settings import get_settings


@functools.cache
def _client(url: str, pid: int) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_connect_timeout=2.0, socket_timeout=2.0, health_check_interval=30
    )


def policy_redis() -> redis.Redis:
    """The Redis client for policy state in this process (a new one after fork)."""
    return _client(get_settings().redis_url, os.getpid())


def broker_redis() -> redis.Redis:
    """A Redis client on the broker (which may be another server than the policies')."""
    return _client(get_settings().broker, os.getpid())


def deadletters() -> DeadLetterStore:
    return DeadLetterStore(policy_redis())


def forget_clients() -> None:
    """Drop cached clients (tests that point the settings elsewhere)."""
    _client.cache_clear()
