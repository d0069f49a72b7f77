"""The bulkhead: a fleet-wide limit on concurrent calls to one resource.

Each permit is a lease in Redis (`holder -> expiry`, by the server's clock).
A holder that dies (SIGKILL, lost host) gives its permit back when its lease
expires; a live holder keeps it by renewing every `lease_ttl / 3` from a
background thread (`Lease`). Taking a permit is one Redis round trip of three
commands, and so is giving it back; dead leases count for nothing and are
purged when the bulkhead is full and at each process's periodic upkeep.

    bulkhead = Bulkhead("payments", redis_client, BulkheadConfig(limit=10))
    with bulkhead.acquire(max_wait=5.0):        # or try_acquire(): fail fast
        call_the_payment_service()

If Redis cannot be reached, the bulkhead goes on with a local in-process
limit of the same size (shared by every `Bulkhead` of that name in the
process) and says so with `StoreUnavailable` / `StoreRestored`. A lease keeps
to the store it was taken from: a local lease is released locally.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster

from policies import events, keys
from policies.bulkhead.store import (
    BulkheadStore,
    MemoryBulkheadStore,
    Outcome,
    Prelude,
    RedisBulkheadStore,
    StoreState,
)
from policies.errors import BulkheadFull, PolicyConfigError
from policies.index import Reader, read_all
from policies.outage import STORE_ERRORS, Outage
from policies.scripts import Queued

__all__ = [
    "Bulkhead",
    "BulkheadConfig",
    "BulkheadSnapshot",
    "Lease",
    "PendingRelease",
    "list_bulkheads",
    "queue_snapshot",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
FALLBACK_MODE = "local per-process limit"


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadConfig:
    """How many permits, how long a lease lives unrenewed, how waiting behaves."""

    #: Permits fleet-wide (per process while Redis is unreachable).
    limit: int = 10
    #: Seconds a lease lives without renewal: how long a dead holder keeps its permit.
    lease_ttl: float = 30.0
    #: Longest pause between attempts in `acquire()` when no release is announced.
    poll_interval: float = 0.5
    #: Smallest `retry_after` reported (a re-queued task should not come straight back).
    min_retry_after: float = 0.05
    #: While Redis is unreachable, seconds between attempts to reach it again.
    probe_interval: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise PolicyConfigError(f"limit must be an int >= 1, got {self.limit!r}")
        _seconds("lease_ttl", self.lease_ttl, minimum=0.05)
        _seconds("poll_interval", self.poll_interval, minimum=0.001)
        _seconds("min_retry_after", self.min_retry_after, minimum=0.0)
        _seconds("probe_interval", self.probe_interval, minimum=0.0)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> BulkheadConfig:
        """Build from settings-like options; an unknown name is a `PolicyConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PolicyConfigError(
                f"unknown bulkhead option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**options)


def _seconds(name: str, value: object, *, minimum: float) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < minimum:  # type: ignore[arg-type, operator]
        raise PolicyConfigError(f"{name} must be finite seconds >= {minimum:g}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadSnapshot:
    """A bulkhead as seen now: its limit, live holders and what is left."""

    name: str
    limit: int
    in_use: int
    available: int
    utilization: float  # in_use / limit (above 1.0 only if the fleet disagrees on the limit)
    holders: tuple[str, ...]
    local: bool = False  # read from the local fallback while Redis is unreachable

    @classmethod
    def of(cls, name: str, limit: int, state: StoreState, *, local: bool) -> BulkheadSnapshot:
        in_use = len(state.holders)
        return cls(
            name=name,
            limit=limit,
            in_use=in_use,
            available=max(limit - in_use, 0),
            utilization=in_use / limit,
            holders=tuple(sorted(state.holders)),
            local=local,
        )


def queue_snapshot(
    store: RedisBulkheadStore, pipe: redis.client.Pipeline, name: str
) -> Reader[BulkheadSnapshot | None]:
    """Queue a read of bulkhead `name` on `pipe`; the reader gives None if it has no limit yet."""
    read = store.queue_state(pipe, name)

    def snapshot(results: Sequence[Any]) -> BulkheadSnapshot | None:
        state = read(results)
        if state.limit is None:
            return None
        return BulkheadSnapshot.of(name, state.limit, state, local=False)

    return snapshot


def list_bulkheads(client: redis.Redis) -> list[BulkheadSnapshot]:
    """Every bulkhead that has been acquired on this Redis, with its stored limit (for status)."""
    store = RedisBulkheadStore(client)
    found = read_all(client, "bulkhead", functools.partial(queue_snapshot, store))
    return [b for b in found if b is not None]


class Lease:
    """One held permit. Release it (or leave the `with` block) when the call is done.

    With `renew=True` the process's renewer thread (one for every lease of the
    process) renews the lease every `lease_ttl / 3` until it is released. If
    a renewal finds the lease gone (it expired during a long pause, or Redis
    lost it), `lost` turns true, a `BulkheadChanged` event with action "lost"
    is emitted and renewal stops: the permit may already be someone else's.
    """

    def __init__(
        self, bulkhead: Bulkhead, holder: str, store: BulkheadStore, since: str = ""
    ) -> None:
        self.bulkhead = bulkhead
        self.holder = holder
        self.store = store
        #: When the store says the lease started (`Outcome.since`), for its release.
        self.since = since
        #: The bulkhead was full with this lease (others may be waiting): give it back
        #: promptly rather than keep it for the holder's next call.
        self.crowded = False
        #: `time.monotonic()` when it was taken.
        self.taken_at = time.monotonic()
        self._done = False  # released (by this process) or lost
        self._lost = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.bulkhead.name

    @property
    def local(self) -> bool:
        """True if taken from the local fallback (Redis was unreachable)."""
        return self.store.local and self.store is not self.bulkhead.store

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def released(self) -> bool:
        return self._done

    def renew(self) -> bool:
        """Extend the lease once. False if it is lost, released, or Redis is unreachable."""
        if self._done:
            return False
        outcome = self.bulkhead._call(
            self.store, lambda s: s.renew(self.name, self.holder, self.bulkhead.config.lease_ttl)
        )
        if outcome is None:
            return False
        if not outcome.ok:
            with self._lock:
                lost = not self._done
                self._lost = self._lost or lost
                self._done = True
            if lost:
                self.bulkhead._changed("lost", outcome.in_use)
        return outcome.ok

    def release(self) -> bool:
        """Give the permit back. True only for the call that freed a live permit."""
        return self.bulkhead.release(self)

    def give_back(self, store: BulkheadStore) -> Outcome:
        """The store call that releases this lease (whoever decided it should)."""
        return store.release(
            self.name, self.holder, limit=self.bulkhead.config.limit, since=self.since
        )

    def start_renewing(self) -> None:
        """Have the process's renewer thread renew this lease until it is released."""
        _renewer().add(self, self.bulkhead.config.lease_ttl / 3)

    def _finish(self) -> bool:
        """Mark released and stop renewing; False if it already was (idempotent)."""
        with self._lock:
            first, self._done = not self._done, True
        return first

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "lost" if self._lost else "released" if self.released else "held"
        return f"<Lease {self.name!r} {self.holder} {state}{' local' if self.local else ''}>"


class _Renewer:
    """Renews the held leases of this process on schedule, from one daemon thread.

    Leases wait in a heap by due time; adding one that is due first wakes the
    thread. A released lease is dropped when it comes due (or when the heap
    is compacted), so releasing costs the renewer nothing.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, float, Lease]] = []  # due, seq, interval, lease
        self._seq = itertools.count()
        self._compact_at = 64
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease, interval: float) -> None:
        entry = (time.monotonic() + interval, next(self._seq), interval, lease)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if len(self._heap) > self._compact_at:
                self._heap = [e for e in self._heap if not e[3].released]
                heapq.heapify(self._heap)
                self._compact_at = max(64, 2 * len(self._heap))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="bulkhead-renewer", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()

    def _next(self) -> tuple[float, Lease]:
        """Wait for the next lease due for renewal (dropping released ones)."""
        with self._cond:
            while True:
                heap = self._heap
                while heap and heap[0][3].released:
                    heapq.heappop(heap)
                wait = heap[0][0] - time.monotonic() if heap else None
                if wait is not None and wait <= 0:
                    _, _, interval, lease = heapq.heappop(heap)
                    return interval, lease
                self._cond.wait(wait)

    def _run(self) -> None:
        while True:
            interval, lease = self._next()
            try:
                lease.renew()
            except Exception:  # pragma: no cover - renew reports its own store errors
                logger.exception("bulkhead %r: renewing %s failed", lease.name, lease.holder)
            if not lease.released:
                entry = (time.monotonic() + interval, next(self._seq), interval, lease)
                with self._cond:
                    heapq.heappush(self._heap, entry)


_renewers: dict[int, _Renewer] = {}
_renewers_lock = threading.Lock()


def _renewer() -> _Renewer:
    """The renewer of this process (a new one after fork: threads do not survive it)."""
    pid = os.getpid()
    found = _renewers.get(pid)
    if found is None:
        with _renewers_lock:
            found = _renewers.setdefault(pid, _Renewer())
    return found


@dataclass(slots=True)
class PendingRelease:
    """A release queued into someone's pipeline; call `finish()` with what `execute()` gave.

    `queued` is the release script queued on the pipeline, or None if nothing
    was queued (the lease was local or already released).
    """

    lease: Lease
    queued: Queued | None
    released: bool = False

    @property
    def index(self) -> int | None:
        """This release's position in the pipeline's results (None: nothing queued)."""
        return None if self.queued is None else self.queued.index

    def finish(self, results: Sequence[Any] | BaseException) -> bool:
        """Read this release's reply from `pipe.execute(raise_on_error=False)`'s results.

        Pass the exception instead if `execute()` raised. A lost connection
        leaves the lease to expire by its TTL; NOSCRIPT (after a server
        restart) runs the release again directly, and so does any other error.
        Returns True if a live permit was freed.
        """
        if self.queued is None:
            return self.released
        bulkhead, lease = self.lease.bulkhead, self.lease
        reply = self.queued.reply(results)
        if isinstance(reply, redis.ConnectionError | redis.TimeoutError):
            bulkhead._outage.failed(reply)
            outcome = None
        elif isinstance(reply, BaseException):
            outcome = bulkhead._call(lease.store, lease.give_back)
        else:
            bulkhead._outage.ok()
            outcome = RedisBulkheadStore.parse_release(reply)
        self.queued = None
        self.released = bulkhead._released(outcome)
        return self.released


class _Wakeup:
    """A generation counter: waiters sleep until it moves (a release) or a timeout."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.generation = 0

    def __call__(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.generation != seen, timeout)


_local_stores: dict[int, MemoryBulkheadStore] = {}
_local_lock = threading.Lock()


def _local_store() -> MemoryBulkheadStore:
    """The fallback store of this process (a new one after fork)."""
    with _local_lock:
        return _local_stores.setdefault(os.getpid(), MemoryBulkheadStore())


class Bulkhead:
    """A named concurrency limit. `store` is a Redis client, a `RedisBulkheadStore` or
    a `MemoryBulkheadStore` (for tests and single-process use)."""

    def __init__(
        self,
        name: str,
        store: redis.Redis | BulkheadStore,
        config: BulkheadConfig | None = None,
        *,
        emitter: events.Emitter | None = None,
    ) -> None:
        try:
            keys.tag("bulkhead", name)
        except ValueError as exc:
            raise PolicyConfigError(f"bulkhead name: {exc}") from None
        self.name = name
        self.config = config or BulkheadConfig()
        self.store: BulkheadStore = (
            RedisBulkheadStore(store) if isinstance(store, (redis.Redis, RedisCluster)) else store
        )
        self.emitter = emitter or events.default_emitter
        self._fallback: BulkheadStore = self.store if self.store.local else _local_store()
        self._lock = threading.Lock()
        self._outage = Outage(
            policy="bulkhead",
            name=name,
            mode=FALLBACK_MODE,
            emitter=self.emitter,
            probe_interval=self.config.probe_interval,
        )
        self._wakeup: _Wakeup | None = None
        self._id = f"{socket.gethostname()}:{os.getpid()}"

    # -- taking a permit -------------------------------------------------------------------

    def try_acquire(self, *, renew: bool = True, prelude: Prelude | None = None) -> Lease:
        """Take a permit now or raise `BulkheadFull` (one Redis round trip).

        `BulkheadFull.retry_after` estimates when a permit may free: the time
        to the earliest lease expiry (when a dead holder's permit returns), or
        sooner if the oldest holder has already held its permit for about the
        average hold time (a moving average kept by the release script), but
        never below `min_retry_after`. It is a hint, not a promise: a holder
        that renews keeps its permit past its expiry.

        `prelude`: commands to send ahead of the acquire in its round trip (the
        outcome of the process's previous call, held for it); called at most once.
        """
        got = self._attempt(renew, prelude)
        if isinstance(got, Lease):
            return got
        raise self._reject(got)

    def acquire(self, max_wait: float, *, renew: bool = True) -> Lease:
        """Take a permit, waiting up to `max_wait` seconds; then raise `BulkheadFull`.

        A waiter wakes when a release is announced on the bulkhead's pub/sub
        channel, and otherwise retries at least every `poll_interval` (and at
        the estimated `retry_after`), so an expired lease is noticed too.
        """
        deadline = time.monotonic() + max(max_wait, 0.0)
        wakeup = self._watch()
        while True:
            seen = wakeup.generation
            got = self._attempt(renew)
            if isinstance(got, Lease):
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._reject(got)
            wakeup.wait(seen, min(remaining, self.config.poll_interval, max(got, 0.01)))

    def _attempt(self, renew: bool, prelude: Prelude | None = None) -> Lease | float:
        holder = f"{self._id}:{os.urandom(6).hex()}"
        limit, ttl = self.config.limit, self.config.lease_ttl
        store = self._store_now()
        outcome = self._call(store, lambda s: s.acquire(self.name, holder, limit, ttl, prelude))
        if outcome is None:
            store = self._fallback
            outcome = store.acquire(self.name, holder, limit, ttl)
        if not outcome.ok:
            return max(outcome.retry_after, self.config.min_retry_after)
        lease = Lease(self, holder, store, outcome.since)
        lease.crowded = outcome.in_use >= limit
        self._changed("acquired", outcome.in_use)
        if renew:
            lease.start_renewing()
        return lease

    def _reject(self, retry_after: float) -> BulkheadFull:
        error = BulkheadFull(self.name, retry_after, self.config.limit)
        self.emitter.emit(
            events.CallRejected(
                policy="bulkhead", name=self.name, reason=error.reason, retry_after=retry_after
            )
        )
        return error

    def _watch(self) -> _Wakeup:
        with self._lock:
            if self._wakeup is None:
                self._wakeup = _Wakeup()
                for store in {id(s): s for s in (self.store, self._fallback)}.values():
                    try:
                        store.on_release(self.name, self._wakeup)
                    except redis.RedisError as exc:  # pragma: no cover - feed connects lazily
                        logger.warning("bulkhead %r: no release feed: %s", self.name, exc)
            return self._wakeup

    # -- giving it back --------------------------------------------------------------------

    def release(self, lease: Lease) -> bool:
        """Give `lease` back (one Redis round trip). Idempotent: True only the first time
        a live permit is freed; False if already released or lost. If Redis is
        unreachable the lease is left to expire by its TTL."""
        if not lease._finish():
            return False
        return self._released(self._call(lease.store, lease.give_back))

    def release_in(self, pipe: redis.client.Pipeline, lease: Lease) -> PendingRelease:
        """Queue the release of `lease` into `pipe` (a pipeline on the same Redis).

        Lets a caller give the permit back and record another script (a
        breaker outcome) in one round trip. Call `.finish(results)` on what
        is returned after `pipe.execute(raise_on_error=False)`. A local or
        already-released lease queues nothing (`index` is None).
        """
        if not isinstance(lease.store, RedisBulkheadStore) or lease.released:
            return PendingRelease(lease, None, self.release(lease))
        lease._finish()
        queued = lease.store.queue_release(
            pipe, self.name, lease.holder, limit=self.config.limit, since=lease.since
        )
        return PendingRelease(lease, queued)

    def _released(self, outcome: Outcome | None) -> bool:
        if outcome is None:
            return False
        self._changed("released", outcome.in_use)
        return outcome.ok

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self) -> BulkheadSnapshot:
        """Limit, holders, in_use, available, utilization (from the local fallback
        while Redis is unreachable; then `local` is true)."""
        store = self._store_now()
        state = self._call(store, lambda s: s.state(self.name))
        if state is None:
            store, state = self._fallback, self._fallback.state(self.name)
        return BulkheadSnapshot.of(
            self.name, self.config.limit, state, local=store is not self.store
        )

    # -- Redis outages ---------------------------------------------------------------------

    def _store_now(self) -> BulkheadStore:
        """The shared store, unless it is down and not yet due for another try."""
        return self.store if self._outage.should_try() else self._fallback

    def _call(self, store: BulkheadStore, op: Callable[[BulkheadStore], T]) -> T | None:
        """Run `op` on `store`; None if it is the shared store and Redis is unreachable."""
        if store.local:
            return op(store)
        try:
            result = op(store)
        except STORE_ERRORS as exc:
            self._outage.failed(exc)
            return None
        self._outage.ok()
        return result

    def _changed(self, action: str, in_use: int) -> None:
        self.emitter.emit(
            events.BulkheadChanged(
                name=self.name, action=action, in_use=in_use, limit=self.config.limit
            )
        )
