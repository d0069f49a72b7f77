"""Where bulkhead leases live: in Redis (shared by the fleet) or in memory.

Both stores keep, per bulkhead, leases `holder -> expiry`, the limit last used
(for `bulwark status`) and a moving average of how long permits are held. Both
have the same semantics:

- a lease whose expiry is not after "now" is dead: it counts for nothing, it
  cannot be renewed or released, and it is purged (at once in memory; in
  Redis when the bulkhead is full and at each process's periodic upkeep);
- acquire by a holder that already has a live lease only renews it (a retried
  acquire never takes two permits);
- release is idempotent: `ok` is true only for the call that gave a live
  permit back.

The Redis store reads time from Redis `TIME` inside its Lua scripts; the
memory store from the clock it is given (a `FakeClock` in tests).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from policies import clock as clocks
from policies import keys
from policies.index import NameIndex, Reader, raise_error
from policies.scripts import Queued, Scripts
from policies.watch import feed_for

#: Weight of the newest hold time in the moving average (same as the Lua scripts).
HOLD_WEIGHT = 0.2

Wake = Callable[[], None]

#: Replies of a pipeline (`execute(raise_on_error=False)`), or the error it raised.
Results = Sequence[Any] | BaseException
#: Commands another policy wants sent ahead of an acquire, in its round trip: queues them
#: on the pipeline and returns what reads their replies (each store calls it at most once;
#: a store that makes no round trip does not call it).
Prelude = Callable[[redis.client.Pipeline], Callable[[Results], None]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one store call did: `ok` (granted, renewed, released) and the live leases after it."""

    ok: bool
    in_use: int
    retry_after: float = 0.0
    #: When a granted lease started, on the store's clock ("" if the store does not say):
    #: handed back on release, it times the hold without a lookup.
    since: str = ""


@dataclass(frozen=True, slots=True)
class StoreState:
    """A bulkhead as stored: its last-used limit (None if never acquired) and live leases."""

    limit: int | None
    holders: dict[str, float]  # holder -> seconds until its lease expires


class BulkheadStore(Protocol):
    """The storage a `Bulkhead` runs on. `local` stores keep state in this process only."""

    local: bool

    def acquire(
        self, name: str, holder: str, limit: int, ttl: float, prelude: Prelude | None = None
    ) -> Outcome: ...

    def release(self, name: str, holder: str, *, limit: int = 0, since: str = "") -> Outcome:
        """Give `holder`'s permit back. `limit` and `since` (the acquire's `Outcome.since`)
        are hints a store may use: announce only releases from a full bulkhead, time the hold
        without a lookup."""
        ...

    def renew(self, name: str, holder: str, ttl: float) -> Outcome: ...

    def state(self, name: str) -> StoreState: ...

    def names(self) -> list[str]: ...

    def on_release(self, name: str, wake: Wake) -> None:
        """Call `wake()` whenever a permit of `name` may have been freed (best effort)."""
        ...


def estimate_wait(
    now: float, expiries: list[float], since: list[float], avg: float | None
) -> float:
    """Seconds until a permit may free: the earliest lease expiry (what a dead
    holder costs), or sooner when the oldest holder has been holding for about
    the average hold time already (what a live holder costs)."""
    wait = min(expiries) - now
    if avg is not None and since:
        wait = min(wait, max(min(since) + avg - now, 0.0))
    return wait


@dataclass
class _Bulkhead:
    limit: int | None = None
    leases: dict[str, float] = field(default_factory=dict)
    since: dict[str, float] = field(default_factory=dict)
    avg_hold: float | None = None
    watchers: list[Wake] = field(default_factory=list)

    def purge(self, now: float) -> int:
        dead = [h for h, expiry in self.leases.items() if expiry <= now]
        for holder in dead:
            del self.leases[holder]
            self.since.pop(holder, None)
        return len(dead)

    def live(self, holder: str, now: float) -> bool:
        return self.leases.get(holder, now) > now

    def drop(self, holder: str) -> None:
        self.leases.pop(holder, None)
        self.since.pop(holder, None)


class MemoryBulkheadStore:
    """Leases in this process (thread-safe); the same rules as the Redis store."""

    local = True

    def __init__(self, clock: clocks.Clock = clocks.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._bulkheads: dict[str, _Bulkhead] = {}

    def _get(self, name: str) -> _Bulkhead:
        found = self._bulkheads.get(name)
        if found is None:
            found = self._bulkheads[name] = _Bulkhead()
        return found

    def acquire(
        self, name: str, holder: str, limit: int, ttl: float, prelude: Prelude | None = None
    ) -> Outcome:
        # No round trip to carry a prelude: its steps stay held and go alone (within
        # workers.held's 10 ms). With several threads at the local limit, a held local
        # release may so refuse a call for that long; a prefork child never parks a lease
        # taken at the limit (`Lease.crowded`).
        with self._lock:
            now, b = self._clock(), self._get(name)
            b.purge(now)
            b.limit = limit
            if holder in b.leases or len(b.leases) < limit:
                b.leases[holder] = now + ttl
                b.since.setdefault(holder, now)
                return Outcome(True, len(b.leases))
            wait = estimate_wait(now, list(b.leases.values()), list(b.since.values()), b.avg_hold)
            return Outcome(False, len(b.leases), wait)

    def release(self, name: str, holder: str, *, limit: int = 0, since: str = "") -> Outcome:
        with self._lock:
            now, b = self._clock(), self._get(name)
            released = b.live(holder, now)
            if released:
                held = max(now - b.since.get(holder, now), 0.0)
                avg = b.avg_hold
                b.avg_hold = held if avg is None else avg * (1 - HOLD_WEIGHT) + held * HOLD_WEIGHT
            b.drop(holder)
            freed = b.purge(now) > 0 or released
            outcome, watchers = Outcome(released, len(b.leases)), list(b.watchers)
        if freed:
            for wake in watchers:
                wake()
        return outcome

    def renew(self, name: str, holder: str, ttl: float) -> Outcome:
        with self._lock:
            now, b = self._clock(), self._get(name)
            renewed = b.live(holder, now)
            if renewed:
                b.leases[holder] = now + ttl
            else:
                b.drop(holder)
            return Outcome(renewed, sum(1 for e in b.leases.values() if e > now))

    def state(self, name: str) -> StoreState:
        with self._lock:
            now, b = self._clock(), self._get(name)
            live = {h: e - now for h, e in b.leases.items() if e > now}
            return StoreState(b.limit, live)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, b in self._bulkheads.items() if b.limit is not None)

    def on_release(self, name: str, wake: Wake) -> None:
        with self._lock:
            self._get(name).watchers.append(wake)


@dataclass(frozen=True, slots=True)
class _Keys:
    """The keys and channel of one bulkhead in Redis."""

    leases: str
    meta: str
    channel: str

    @property
    def all(self) -> tuple[str, str]:
        return self.leases, self.meta


@functools.cache
def _keys(name: str) -> _Keys:
    """Built once per bulkhead name (key building validates every part)."""
    leases, meta = (keys.key("bulkhead", name, f) for f in ("leases", "meta"))
    return _Keys(leases, meta, keys.channel("bulkhead", name))


#: One release in this many feeds the average hold time even when the bulkhead was not
#: full (a release from a full bulkhead always does: that is when the estimate is read).
HOLD_SAMPLE = 8


class RedisBulkheadStore:
    """Leases in Redis, shared by every process on the same server (one script per call).

    The hot path is three commands a call. Storing the limit, purging dead
    leases and pushing the expiry on happen on a process's first acquire of a
    bulkhead and then every `ttl / 2` ("upkeep"); a full bulkhead purges at once.
    """

    local = False

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._scripts = Scripts(client)
        self.index = NameIndex(client, "bulkhead")
        #: (name, limit, ttl) -> monotonic time its next upkeep is due.
        self._upkeep: dict[tuple[str, int, float], float] = {}
        self._releases = itertools.count()

    def _upkeep_due(self, name: str, limit: int, ttl: float) -> bool:
        key, now = (name, limit, ttl), time.monotonic()
        if self._upkeep.get(key, 0.0) > now:
            return False
        self._upkeep[key] = now + ttl / 2
        return True

    def acquire(
        self, name: str, holder: str, limit: int, ttl: float, prelude: Prelude | None = None
    ) -> Outcome:
        self.index.add(name)
        upkeep = self._upkeep_due(name, limit, ttl)
        args = [holder, limit, repr(ttl), "1" if upkeep else "0"]
        try:
            if prelude is None:
                raw = self._scripts["bulkhead_acquire"](keys=_keys(name).all, args=args)
            else:
                raw = self._acquire_after(prelude, name, args)
            granted, in_use, wait, since = raw
        except BaseException:
            if upkeep:
                self._upkeep.pop((name, limit, ttl), None)  # not done: the next call does it
            raise
        return Outcome(bool(granted), int(in_use), float(wait), _text(since))

    def _acquire_after(self, prelude: Prelude, name: str, args: list[Any]) -> Any:
        """The acquire script behind `prelude`'s commands, in one round trip. Whatever
        happens, the prelude's commands are settled once (with the error, if one came)."""
        pipe = self.client.pipeline(transaction=False)
        settle = prelude(pipe)
        try:
            queued = self._scripts.queue(pipe, "bulkhead_acquire", _keys(name).all, args)
            results = pipe.execute(raise_on_error=False)
        except BaseException as exc:  # unreachable, a time limit, an interrupt
            settle(exc)
            raise
        settle(results)
        return raise_error(queued.reply(results))

    def _release_args(self, name: str, holder: str, limit: int, since: str) -> list[Any]:
        sample = next(self._releases) % HOLD_SAMPLE == 0
        return [holder, _keys(name).channel, limit, since, "1" if sample else "0"]

    def release(self, name: str, holder: str, *, limit: int = 0, since: str = "") -> Outcome:
        args = self._release_args(name, holder, limit, since)
        return self.parse_release(
            self._scripts["bulkhead_release"](keys=_keys(name).all, args=args)
        )

    def queue_release(
        self, pipe: redis.client.Pipeline, name: str, holder: str, *, limit: int = 0,
        since: str = "",
    ) -> Queued:  # fmt: skip
        """Queue the release script on `pipe` as a bare EVALSHA (see `Scripts.queue`).

        A server that lost its script cache answers NOSCRIPT for this entry;
        `PendingRelease.finish` then releases directly (once, after a restart).
        """
        args = self._release_args(name, holder, limit, since)
        return self._scripts.queue(pipe, "bulkhead_release", _keys(name).all, args)

    @staticmethod
    def parse_release(raw: Any) -> Outcome:
        released, in_use = raw
        return Outcome(bool(released), int(in_use))

    def renew(self, name: str, holder: str, ttl: float) -> Outcome:
        renewed, in_use = self._scripts["bulkhead_renew"](
            keys=(_keys(name).leases,), args=[holder, repr(ttl)]
        )
        return Outcome(bool(renewed), int(in_use))

    def state(self, name: str) -> StoreState:
        k = _keys(name)
        return _state(self._scripts["bulkhead_snapshot"](keys=(k.leases, k.meta), args=[]))

    def queue_state(self, pipe: redis.client.Pipeline, name: str) -> Reader[StoreState]:
        """Queue a read of `name` on `pipe`; the returned reader parses its reply."""
        k = _keys(name)
        queued = self._scripts.queue(pipe, "bulkhead_snapshot", (k.leases, k.meta), [])
        return lambda results: _state(raise_error(queued.reply(results)))

    def names(self) -> list[str]:
        return self.index.names()

    def on_release(self, name: str, wake: Wake) -> None:
        feed_for(self.client).watch(_keys(name).channel, lambda _payload: wake())


def _state(raw: list[Any]) -> StoreState:
    limit = int(raw[0]) if raw[0] else None
    pairs = raw[1:]
    return StoreState(
        limit, {_text(pairs[i]): float(pairs[i + 1]) for i in range(0, len(pairs), 2)}
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
