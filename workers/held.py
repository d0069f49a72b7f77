"""The outcome of a finished call, held for this process's next round trip.

After a task body the guard books the breaker outcome, frees the bulkhead lease and
counts the call for the retry budget: one pipelined round trip, waited for before the
child reports the task done. When the call succeeded, that step is *held* instead and
rides in front of the next bulkhead acquire of this process, in the acquire's round
trip: release, then acquire, in that order, so the process never holds two leases of a
bulkhead and the limit is never exceeded. A busy worker process makes one round trip
per guarded task instead of two.

A success also *parks* its bulkhead lease: the process's next call on the same bulkhead
takes it over instead of acquiring (no round trip at all). Nobody took it `HOLD_WITHIN`
after it was parked: it is released, by its held step or, if that went earlier (with
another call's acquire, or with the steps held before it), by the flusher when it is due,
or in front of the process's next acquire if it grew too old to take over meanwhile.
So a process busy with one bulkhead keeps one permit while it has work (for `PARK_FOR`
at most), and gives it back `HOLD_WITHIN` after its last call:
the fleet never holds more permits than the limit, and a process between two calls
holds at most one. Its held steps (the breaker outcomes, the budget's count) then go
together, once per `HOLD_WITHIN`, instead of once per task. A lease taken when the
bulkhead was full (`Lease.crowded`: others may be waiting) is never parked, and its
release is sent at once, not held.

A held step waits at most `HOLD_WITHIN` seconds: a thread of the process sends it alone
when no acquire came to carry it. It is sent before the process exits (Celery's
`worker_process_shutdown`, and at exit). Failures, execute-once settlements and anything
that must be known before the task is acknowledged are never held: they go at once,
behind whatever is held. A process killed with held steps loses them as it would lose a
step under way: the lease frees at its expiry, the breaker misses one success.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import signals

from policies.bulkhead import Lease
from policies.bulkhead.store import Results
from workers.resources import PerProcess, policy_redis

__all__ = ["HOLD_WITHIN", "PARK_FOR", "Held", "Step", "held"]

logger = logging.getLogger(__name__)

#: Longest a held step waits for an acquire to carry it before it is sent alone.
HOLD_WITHIN = 0.01

#: A lease parked this long whose step never came (it failed to queue) is released.
ORPHAN_AFTER = 1.0


@dataclass(slots=True)
class _Parked:
    lease: Lease
    at: float  # when it was parked (monotonic)
    due: float  # when the flusher releases it if it is still parked
    sent: bool = False  # its step went, leaving it parked (`gives_back`)


#: Longest a lease is taken over from call to call: then it is given back and taken
#: again, so a process learns whether the bulkhead filled up meanwhile.
PARK_FOR = 1.0

#: Queues its commands on the pipeline it is given and returns what reads their replies.
Step = Callable[[redis.client.Pipeline], Callable[[Results], None]]


class Held:
    """The held steps of one process, on one Redis client."""

    def __init__(self, client: redis.Redis, within: float = HOLD_WITHIN) -> None:
        self.client = client
        self.within = within
        #: Held by whoever sends held steps (a carrying acquire, the flusher, `send`), so
        #: they reach Redis in the order they were held, before what comes after them.
        self.sending = threading.RLock()
        self._steps: list[Step] = []
        self._since = 0.0
        self._changed = threading.Condition()
        self._idle = False
        #: Bulkhead name -> its leases parked here, to be taken over or released.
        self._parked: dict[str, list[_Parked]] = {}
        self._flusher: threading.Thread | None = None

    def pending(self) -> bool:
        """Whether an acquire has something to carry: held steps, or parked leases (one
        may be due, or too old to take over: released before the acquire)."""
        return bool(self._steps) or any(self._parked.values())

    def hold(self, step: Step) -> None:
        """Keep `step` for the next round trip (at most `within` seconds)."""
        with self._changed:
            if not self._steps:
                self._since = time.monotonic()
            self._steps.append(step)
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_when_due, name="bulwark-held", daemon=True
                )
                self._flusher.start()
            elif self._idle:
                self._changed.notify()

    @staticmethod
    def parks(lease: Lease) -> bool:
        """May `lease` be kept for the next call: a shared one, with room left when it was
        taken, not older than `PARK_FOR`."""
        return (
            not lease.store.local
            and not lease.crowded
            and time.monotonic() - lease.taken_at < PARK_FOR
        )

    def park(self, lease: Lease) -> None:
        """Keep `lease` for this process's next call on its bulkhead (see `take`)."""
        now = time.monotonic()
        with self._changed:
            self._parked.setdefault(lease.name, []).append(_Parked(lease, now, now + ORPHAN_AFTER))

    def take(self, bulkhead: str) -> Lease | None:
        """A parked lease of `bulkhead`, live and taken less than `PARK_FOR` ago, now the
        caller's; or None. Call it holding `sending` (a step on its way may release it)."""
        now = time.monotonic()
        with self._changed:
            parked = self._parked.get(bulkhead, [])
            for at in range(len(parked) - 1, -1, -1):
                lease = parked[at].lease
                if lease.released or lease.lost or _too_old(lease, now):
                    continue  # its step, or the flusher, releases it (or finds it gone)
                del parked[at]
                lease.since = ""  # held across calls: no sample of one call's hold time
                return lease
        return None

    def gives_back(self, lease: Lease) -> bool:
        """Asked by a parked lease's step as it is queued: True if the step is to release
        it now (still parked, and parked `within` ago or more, or too old to be taken over
        by then). One parked more recently stays parked, for the process's next call, until
        `within` after it was parked: then the flusher releases it if nobody took it, and
        so does the process's next acquire if it is too old to take over by then
        (`prelude`: released before the acquire, so a process never holds two)."""
        now = time.monotonic()
        with self._changed:
            parked = self._parked.get(lease.name, [])
            for at, one in enumerate(parked):
                if one.lease is lease:
                    due = one.at + self.within
                    if due <= now or _too_old(lease, due):
                        del parked[at]
                        return True
                    one.due, one.sent = due, True
                    return False
        return False

    def prelude(self, pipe: redis.client.Pipeline) -> Callable[[Results], None]:
        """Queue every held step on `pipe` (call it holding `sending`), then the release of
        every parked lease that is due or too old to take over. A step that fails to queue
        is said and skipped: the others go."""
        with self._changed:
            steps, self._steps = self._steps, []
        settles = [one for one in map(lambda step: _queued(step, pipe), steps) if one]
        settles += self._due(pipe, leave=False)

        def settle(results: Results) -> None:
            for one in settles:
                one(results)

        return settle

    def send(self, step: Step | None = None, *, leave: bool = False) -> None:
        """Send what is held, and `step` behind it, in one round trip (now). Parked leases
        whose step was lost are released too; `leave`: every parked lease (at exit)."""
        with self.sending:
            pipe = self.client.pipeline(transaction=False)
            settles = [self.prelude(pipe), *(self._due(pipe, leave=True) if leave else [])]
            if step is not None:
                queued = _queued(step, pipe)
                if queued is not None:
                    settles.append(queued)
            if not len(pipe):
                return
            results: Results
            try:
                results = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:
                results = exc
            except BaseException as exc:  # a time limit, an interrupt: settled, then on
                for settle in settles:
                    settle(exc)
                raise
            for settle in settles:
                settle(results)

    def _due(self, pipe: redis.client.Pipeline, leave: bool) -> list[Callable[[Results], None]]:
        """Release the parked leases that are due: nobody took one `within` after it was
        parked (its step went earlier), one whose step went is too old to take over, or
        its step is gone (it failed to queue: `ORPHAN_AFTER`); all of them when the process
        leaves. A release that fails to queue is said and skipped (the lease frees at its
        expiry): the steps queued before it still go."""
        now = time.monotonic()
        found: list[Lease] = []
        with self._changed:  # taken off the parked ones here: nobody takes them over now
            for parked in self._parked.values():
                found += [one.lease for one in parked if leave or _releasable(one, now)]
                parked[:] = [one for one in parked if not (leave or _releasable(one, now))]
        settles = []
        for lease in found:
            try:
                settles.append(lease.bulkhead.release_in(pipe, lease).finish)
            except Exception:
                logger.exception("a parked lease's release could not be queued")
        return settles

    def _flush_when_due(self) -> None:
        while True:
            with self._changed:
                while (wait := self._until_due()) is None or wait > 0:
                    self._idle = not self._steps  # `hold` wakes it for a first step
                    self._changed.wait(wait)
                    self._idle = False
            try:
                self.send()
            except Exception:  # a settle that raised: said, the process goes on
                logger.exception("held policy steps could not be settled")

    def _until_due(self) -> float | None:
        """Seconds until the held steps or a parked lease are due; None: nothing is."""
        dues = [one.due for parked in self._parked.values() for one in parked]
        if self._steps:
            dues.append(self._since + self.within)
        return min(dues) - time.monotonic() if dues else None


def _too_old(lease: Lease, now: float) -> bool:
    return now - lease.taken_at >= PARK_FOR


def _releasable(one: _Parked, now: float) -> bool:
    """Due, or too old to take over with its step gone (`Held._due`)."""
    return one.due <= now or (one.sent and _too_old(one.lease, now))


def _queued(step: Step, pipe: redis.client.Pipeline) -> Callable[[Results], None] | None:
    try:
        return step(pipe)
    except Exception:
        logger.exception("a held policy step could not be queued; the others go")
        return None


_held: PerProcess[Held] = PerProcess()


def held() -> Held:
    """This process's held steps, on the policy store's client (a new one after the
    settings point elsewhere: `workers.resources.forget`)."""
    client = policy_redis()
    return _held.get(id(client), lambda: Held(client))


def _send_held(**_: Any) -> None:
    for one in _held.mine():  # a forked child's copy of its parent's is not its to send
        try:
            one.send(leave=True)
        except Exception:
            logger.warning("held policy steps not sent at exit", exc_info=True)


signals.worker_process_shutdown.connect(_send_held, weak=False, dispatch_uid="bulwark.held")
atexit.register(_send_held)
