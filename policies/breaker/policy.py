"""The fleet-wide circuit breaker.

    breaker = CircuitBreaker("payments", BreakerConfig(), RedisBreakerStore(client))
    with breaker.guard():            # or breaker.call(fn, ...), or @breaker
        charge()

`acquire()` costs one Redis round trip at most, and none while the local
cache says closed (or open with time left) and the change feed is healthy;
`record()` costs one. Every step is one call of breaker_step.lua, timed by
Redis TIME; each change is PUBLISHed, so other processes drop their cache.
If Redis is unreachable the breaker runs on a local in-memory breaker with
the same config (fail_open) or refuses calls (fail_closed), says so with
events, and tries Redis again every `store_retry_interval` seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

import redis

from policies import events, keys
from policies.breaker.config import (
    BreakerConfig,
)
from policies.breaker.memory import MemoryBreakerStore
from policies.breaker.store import (
    BreakerSnapshot,
    BreakerStore,
    Permit,
    RedisBreakerStore,
    Reply,
)
from policies.clock import Clock, monotonic
from policies.errors import CircuitOpen
from policies.outage import STORE_ERRORS, Outage
from policies.scripts import Queued

__all__ = ["CircuitBreaker", "PendingRecord"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class _Cached:
    """The last state this process learnt, with `until` on the breaker's local clock."""

    mode: str
    state: str
    gen: int
    until: float


@dataclass(slots=True)
class PendingRecord:
    """A record step queued on a caller's pipeline; `settle` it with the pipeline's result."""

    breaker: CircuitBreaker
    permit: Permit
    failed: bool
    #: The step queued on the pipeline; None if it was recorded without the pipeline.
    queued: Queued | None
    trust: int | None = None

    @property
    def index(self) -> int | None:
        """Position of the step in the pipeline's results (None: nothing was queued)."""
        return None if self.queued is None else self.queued.index

    def settle(self, replies: Sequence[Any] | BaseException) -> None:
        """Book the reply of `pipe.execute(raise_on_error=False)`, or the error it raised.

        NOSCRIPT (a restarted server) runs the step again directly; any other
        error books the outcome on the local fallback.
        """
        if self.queued is None:
            return
        raw = self.queued.reply(replies)
        if isinstance(raw, BaseException):
            self.breaker._record_locally(self.permit, self.failed, raw)
        else:
            self.breaker._after(Reply.parse(raw), self.breaker.store, self.trust)


class CircuitBreaker:
    """One named breaker; share the object between threads, create one per process."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        store: BreakerStore | None = None,
        *,
        emitter: events.Emitter | None = None,
        clock: Clock = monotonic,
    ) -> None:
        keys.tag("breaker", name)  # refuses names Redis keys cannot carry
        self.name = name
        self.config = config or BreakerConfig()
        self.store: BreakerStore = store or MemoryBreakerStore(clock)
        self._emitter = emitter or events.default_emitter
        self._clock = clock
        self._cache: _Cached | None = None
        self._seen_gen = -1
        self._feed_losses = 0
        self._watch_pid = 0
        self._local: MemoryBreakerStore | None = None
        mode = "local fail-open" if self.config.on_store_error == "fail_open" else "fail-closed"
        self._outage = Outage(
            policy="breaker",
            name=name,
            mode=mode,
            emitter=self._emitter,
            probe_interval=self.config.store_retry_interval,
            clock=clock,
        )
        self._lock = threading.Lock()  # outage bookkeeping only; never held around a call

    # -- the call path -------------------------------------------------------------------------

    def acquire(self) -> Permit:
        """Leave for one call; raises CircuitOpen when the breaker refuses it."""
        self._ensure_watch()
        cached = self._cache
        if cached is not None and self._local is None and self.store.cache_trusted():
            permit = self._from_cache(cached)
            if permit is not None:
                return permit
        permit_id = os.urandom(8).hex()
        reply, store = self._step(
            lambda s: s.acquire(self.name, self.config, permit_id), refuse_local=True
        )
        source = "disabled" if reply.mode == "disabled" else store.source
        if not reply.admitted:
            self._reject(reply.shown, reply.retry_after)
        if reply.would_reject:
            self._report_unenforced(reply.state, reply.retry_after)
        return Permit(
            name=self.name,
            id=permit_id,
            gen=reply.gen,
            trial=reply.trial,
            would_reject=reply.would_reject,
            source=source,
        )

    def record(self, permit: Permit, success: bool = True, duration: float = 0.0) -> None:
        """Book the outcome of a call admitted by `permit`; never raises on a store outage."""
        if permit.source == "disabled":
            return
        failed = self._booked(success, duration)
        self._step(lambda s: s.record(self.name, self.config, self._for(s, permit), failed))

    def release(self, permit: Permit) -> None:
        """Give back a permit whose call never ran: frees its trial slot, books no outcome.

        Only a half-open trial permit costs a round trip; others are free to release.
        """
        if permit.trial and permit.source != "disabled":
            self._step(lambda s: s.release(self.name, self.config, self._for(s, permit)))

    def record_in(
        self,
        pipe: redis.client.Pipeline,
        permit: Permit,
        success: bool = True,
        duration: float = 0.0,
    ) -> PendingRecord:
        """Queue the record step on the caller's pipeline (one round trip with its other work).

        Run `pipe.execute(raise_on_error=False)` and pass its result (or the error it raised) to
        `settle()`. Without a Redis store, or while Redis is down, it records at once instead.
        """
        store = self.store
        if (
            permit.source in ("disabled", "local")
            or self._local is not None
            or not isinstance(store, RedisBreakerStore)
        ):
            self.record(permit, success, duration)
            return PendingRecord(self, permit, False, None)
        failed = self._booked(success, duration)
        queued = store.queue_record(pipe, self.name, self.config, permit, failed)
        return PendingRecord(self, permit, failed, queued, self._trust())

    def classify(self, exc: BaseException) -> bool:
        """True if `exc` counts as a failure (config: counts, else record_on minus ignore)."""
        return self.config.classify(exc)

    @contextlib.contextmanager
    def guard(self) -> Iterator[Permit]:
        """`with breaker.guard(): ...` acquires, runs the block, records its outcome.

        An exception that does not count (see `classify`) is booked as a success: the
        dependency answered. A BaseException that is not an Exception (KeyboardInterrupt,
        cancellation) books nothing; a trial slot then frees after `trial_ttl`.
        """
        permit = self.acquire()
        start = time.perf_counter()
        try:
            yield permit
        except Exception as exc:
            self.record(permit, not self.classify(exc), time.perf_counter() - start)
            raise
        self.record(permit, True, time.perf_counter() - start)

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run `fn(*args, **kwargs)` through the breaker."""
        with self.guard():
            return fn(*args, **kwargs)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Use the breaker as a decorator."""

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.guard():
                return fn(*args, **kwargs)

        return guarded

    # -- operators -----------------------------------------------------------------------------

    def force_open(self) -> str:
        """Refuse every call until reset (fleet-wide). Returns the new state."""
        return self._command("force_open")

    def reset(self) -> str:
        """Back to closed, counters and trials cleared, operator mode dropped."""
        return self._command("reset")

    force_close = reset

    def disable(self) -> str:
        """Admit every call and record nothing, until reset."""
        return self._command("disable")

    def metrics_only(self) -> str:
        """Admit every call; keep recording and report what the breaker would have done."""
        return self._command("metrics_only")

    def snapshot(self) -> BreakerSnapshot:
        """The state now (from the local fallback, `source="local"`, while Redis is down)."""
        store = self._local if self._local is not None else self.store
        try:
            return store.snapshot(self.name, self.config)
        except STORE_ERRORS as exc:
            return self._enter_outage(exc).snapshot(self.name, self.config)

    def _command(self, op: str) -> str:
        """Operator commands go to the shared store; a Redis error is raised, not hidden."""
        trust = self._trust()
        reply = self.store.command(self.name, self.config, op)
        if self._local is not None:
            self._leave_outage()
        self._after(reply, self.store, trust)
        return reply.shown

    # -- internals -----------------------------------------------------------------------------

    def _booked(self, success: bool, duration: float) -> bool:
        failed = self.config.failed(success, duration)
        if self.config.report_calls:
            slow = failed and success
            self._emitter.emit(
                events.CallRecorded(
                    name=self.name, success=not failed, duration=duration, slow=slow
                )
            )
        return failed

    def _for(self, store: BreakerStore, permit: Permit) -> Permit:
        """A trial permit means nothing to another store: book it there as an ordinary call."""
        issued_locally = permit.source == "local"
        if permit.trial and issued_locally != (store is self._local):
            return replace(permit, trial=False)
        return permit

    def _from_cache(self, cached: _Cached) -> Permit | None:
        if cached.mode == "disabled":
            return Permit(name=self.name, id="", gen=cached.gen, source="disabled")
        if cached.mode == "forced_open":
            self._reject("forced_open", self.config.open_timeout)
        if cached.state == "closed":
            return Permit(name=self.name, id="", gen=cached.gen, source="cache")
        left = cached.until - self._clock()
        if cached.state != "open" or left <= 0:
            return None
        if cached.mode != "metrics_only":
            self._reject(cached.state, left)
        self._report_unenforced("open", left)
        return Permit(name=self.name, id="", gen=cached.gen, would_reject=True, source="cache")

    def _reject(self, state: str, retry_after: float) -> None:
        reason = f"circuit {state}"
        self._emitter.emit(
            events.CallRejected(
                policy="breaker", name=self.name, reason=reason, retry_after=retry_after
            )
        )
        raise CircuitOpen(self.name, retry_after, state)

    def _report_unenforced(self, state: str, retry_after: float) -> None:
        reason = f"not enforced (metrics_only): circuit {state}"
        self._emitter.emit(
            events.CallRejected(
                policy="breaker", name=self.name, reason=reason, retry_after=retry_after
            )
        )

    def _step(
        self, step: Callable[[BreakerStore], Reply], *, refuse_local: bool = False
    ) -> tuple[Reply, BreakerStore]:
        """Run one step on the shared store, or on the local fallback while Redis is down."""
        local = self._local
        if local is None or self._outage.should_try():
            trust = self._trust()
            try:
                reply = step(self.store)
            except STORE_ERRORS as exc:
                local = self._enter_outage(exc)
            else:
                if local is not None:
                    self._leave_outage()
                self._after(reply, self.store, trust)
                return reply, self.store
        if refuse_local and self.config.on_store_error == "fail_closed":
            self._reject("store_unavailable", self._outage.next_try_in())
        reply = step(local)
        self._after(reply, local)
        return reply, local

    def _record_locally(self, permit: Permit, failed: bool, exc: BaseException) -> None:
        local = self._enter_outage(exc)
        self._after(local.record(self.name, self.config, self._for(local, permit), failed), local)

    def _trust(self) -> int | None:
        """Taken before a step: whether its reply may be cached (the feed must not drop between)."""
        return self._feed_losses if self.store.cache_trusted() else None

    def _after(self, reply: Reply, store: BreakerStore, trust: int | None = None) -> None:
        """Cache the state a step answered and report the transition it made."""
        if trust is not None and trust == self._feed_losses and self.store.cache_trusted():
            current = self._cache
            if reply.gen >= self._seen_gen and (current is None or current.gen <= reply.gen):
                until = self._clock() + reply.retry_after if reply.state == "open" else 0.0
                self._cache = _Cached(reply.mode, reply.state, reply.gen, until)
        if reply.transition is not None:
            before, after, reason = reply.transition
            if store is self._local:
                reason = f"local (store unavailable): {reason}"
            self._emitter.emit(
                events.BreakerTransition(
                    name=self.name, from_state=before, to_state=after, reason=reason
                )
            )

    def _ensure_watch(self) -> None:
        pid = os.getpid()
        if self._watch_pid != pid:
            self._watch_pid = pid
            self._cache = None
            self.store.watch(self.name, self._on_change)

    def _on_change(self, payload: bytes | None) -> None:
        """A change feed message: drop the cache if it is older than the change."""
        if payload is None:
            self._feed_losses += 1
            self._seen_gen = -1  # a restarted Redis counts gens from 0 again
            self._cache = None
            return
        gen = int(payload.split()[0])
        self._seen_gen = max(self._seen_gen, gen)
        cached = self._cache
        if cached is not None and cached.gen < gen:
            self._cache = None

    def _enter_outage(self, exc: BaseException) -> MemoryBreakerStore:
        with self._lock:
            local = self._local
            if local is None:
                local = self._local = MemoryBreakerStore(self._clock, source="local")
        self._cache = None
        self._seen_gen = -1
        self._outage.failed(exc)
        return local

    def _leave_outage(self) -> None:
        with self._lock:
            self._local = None
        self._outage.ok()
