"""When to restart a crashed process, and when its crashes are a loop worth an alert.

Pure decisions for a process supervisor (`workers.ops.supervisor`): the delay
before the next start grows with the crashes inside the window (exponential,
capped, like systemd's and Kubernetes' back-off); `loop_restarts` crashes within
`loop_window` seconds make a crash loop. The process is still restarted (at the
capped delay): the rest of the fleet keeps running either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policies.errors import PolicyConfigError

__all__ = ["RestartPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartPolicy:
    """Exponential restart back-off with crash-loop detection."""

    #: Seconds before the first restart.
    base_delay: float = 1.0
    #: Cap on any restart delay.
    max_delay: float = 30.0
    #: Crashes within `loop_window` seconds that make a crash loop.
    loop_restarts: int = 5
    loop_window: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.base_delay <= self.max_delay:
            raise PolicyConfigError(
                f"restart delays need 0 < base_delay <= max_delay, got "
                f"{self.base_delay!r} and {self.max_delay!r}"
            )
        if self.loop_restarts < 1 or self.loop_window <= 0:
            raise PolicyConfigError(
                f"a crash loop needs loop_restarts >= 1 and loop_window > 0, got "
                f"{self.loop_restarts!r} and {self.loop_window!r}"
            )

    def recent(self, crashes: Sequence[float], now: float) -> int:
        """Crashes (times, seconds) inside the window ending at `now`."""
        return sum(1 for at in crashes if now - self.loop_window < at <= now)

    def delay(self, crashes: Sequence[float], now: float) -> float:
        """Seconds to wait before starting the process again after its latest crash."""
        n = max(1, self.recent(crashes, now))
        return float(min(self.max_delay, self.base_delay * 2 ** min(n - 1, 30)))

    def looping(self, crashes: Sequence[float], now: float) -> bool:
        """Whether the crashes inside the window make a crash loop."""
        return self.recent(crashes, now) >= self.loop_restarts
