"""Per-process clients built on first use (after fork), never at import."""

from __future__ import annotations

import functools
import os

import redis

from policies.deadletter import DeadLetterStore
from workers.settings import get_settings


@functools.cache
def _policy_redis(pid: int) -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().redis_url,
        socket_connect_timeout=2.0,
        socket_timeout=2.0,
        health_check_interval=30,
    )


def policy_redis() -> redis.Redis:
    """The Redis client for policy state in this process (a new one after fork)."""
    return _policy_redis(os.getpid())


def deadletters() -> DeadLetterStore:
    return DeadLetterStore(policy_redis())
