"""One leader per role fleet-wide (beat), and each scheduled run once per time slot.

`Leadership.hold()` takes the role's lock, or keeps it, in one script call: a
Redis hash `holder, token` with a TTL that only its holder renews. A holder
that dies (SIGKILL, a lost host) stops renewing, and another takes over once
the TTL has run out. Each new leader gets a larger fencing token (INCR).

`Leadership.claim(token, job, slot)` marks one run of a job for one time slot,
in one script call that also checks the token is still the current leader's:
a leader that lost the lock while paused can claim nothing, and a new leader
cannot run a slot its predecessor already ran. The claim also records when the
job was last sent (`last_sent`), so that a new leader, whose own schedule has
not moved while it stood by, can tell whether a run it thinks overdue was sent
by its predecessor already. Slots that fall inside the failover (at most the
TTL) are skipped, not made up, as Celery's beat does for runs it missed while
stopped.
"""

from __future__ import annotations

import math
from typing import Any

import redis

from policies import keys
from policies.errors import PolicyConfigError
from policies.scripts import Scripts

__all__ = ["CLAIMED", "DEPOSED", "RAN_ALREADY", "Leadership", "slot_of"]

CLAIMED, RAN_ALREADY, DEPOSED = 1, 0, -1


def slot_of(now: float, every: float) -> int:
    """The time slot `now` falls in, for a job run every `every` seconds (slots start at
    multiples of `every` since the epoch; at least 1 s wide)."""
    width = every if math.isfinite(every) and every >= 1.0 else 1.0
    return int(now // width)


class Leadership:
    """The lock of one role (`beat`) held by `holder` (`<host>:<pid>`)."""

    def __init__(self, client: redis.Redis, role: str, holder: str, ttl: float) -> None:
        if not (math.isfinite(ttl) and ttl > 0):
            raise PolicyConfigError(f"leadership ttl must be seconds > 0, got {ttl!r}")
        self.role, self.holder, self.ttl = role, holder, ttl
        self._lock = keys.key("leader", role, "lock")
        self._tokens = keys.key("leader", role, "tokens")
        self._scripts = Scripts(client)
        self._client = client

    def hold(self) -> int | None:
        """Take or renew the lock: this holder's fencing token, or None if another leads."""
        token = int(self._scripts["leader_hold"](
            keys=[self._lock, self._tokens], args=[self.holder, max(1, int(self.ttl * 1000))]
        ))  # fmt: skip
        return token or None

    def leader(self) -> tuple[str, int] | None:
        """(holder, token) of the current leader, or None."""
        raw: Any = self._client.hmget(self._lock, "holder", "token")
        if raw[0] is None:
            return None
        holder = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        return holder, int(raw[1] or 0)

    def release(self) -> bool:
        """Give the lock up at once if this holder still has it (a clean stop: the standby
        need not wait for the TTL). One script: never deletes another holder's lock."""
        return bool(self._scripts["leader_release"](keys=[self._lock], args=[self.holder]))

    def claim(self, token: int, job: str, slot: int, now: float, keep: float = 86400.0) -> int:
        """Claim `job`'s run for `slot` at `now` (unix seconds): CLAIMED (run it; `now` is
        then the job's `last_sent`), RAN_ALREADY, or DEPOSED."""
        slot_key = keys.key("leader", self.role, f"slot:{job}:{slot}")  # refuses odd names
        last_key = keys.key("leader", self.role, f"last:{job}")
        return int(self._scripts["leader_claim"](
            keys=[self._lock, slot_key, last_key], args=[token, max(1, int(keep)), repr(now)]
        ))  # fmt: skip

    def last_sent(self, job: str) -> float | None:
        """When any leader last sent `job` (unix seconds), or None."""
        raw = self._client.get(keys.key("leader", self.role, f"last:{job}"))
        return float(raw) if raw is not None else None
