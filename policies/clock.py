"""Clocks for in-memory stores. Redis-backed stores take time from Redis `TIME`."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds, monotonic within a process."""
        ...


def monotonic() -> float:
    return time.monotonic()


class FakeClock:
    """A clock that moves only when told: for tests of time-based rules."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.now += seconds
