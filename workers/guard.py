"""The policies of one `ResilientTask` in one worker process, and the hot path through them.

Before the body: the degradation level and the breaker come from local caches
kept fresh by pub/sub (no round trip while the change feed is healthy); the
bulkhead lease is one Redis round trip. After the body: the breaker outcome,
the lease release and (once a second) the retry budget's call count go out in
ONE pipeline.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from celery.exceptions import Ignore, Reject, Retry

from policies import events
from policies.breaker import CircuitBreaker, Permit
from policies.budget import RetryBudget
from policies.bulkhead import Bulkhead, Lease
from policies.bulkhead.store import Results
from policies.classify import FailureKind
from policies.degradation import Degradation
from policies.errors import (
    AlreadyRunning,
    Interrupted,
    PolicyRejected,
    RetryBudgetExhausted,
    ServiceDegraded,
)
from policies.once import Claim, ExecuteOnce
from policies.retry import RetryPolicy
from workers import listeners
from workers.held import Held, Step, held
from workers.resources import PerProcess, policy, policy_redis
from workers.settings import Settings, get_settings

logger = logging.getLogger(__name__)

#: Celery's own control flow raised from a task body: not a failure of the dependency.
CONTROL_FLOW = (Retry, Ignore, Reject)
_NO_RESULT: Any = object()
DEFERRALS_HEADER = "bulwark_deferrals"
ATTEMPT_HEADER = "bulwark_attempt"


class GuardedTask(Protocol):
    """What the guard needs of a task (`workers.task.ResilientTask` is one)."""

    name: str
    request: Any
    breaker: str | None
    bulkhead: str | None
    service: str | None
    budget: str | None
    fallback: Callable[..., Any] | None
    defer_max: int | None
    once: bool

    def run(self, *args: Any, **kwargs: Any) -> Any: ...

    def header(self, name: str, default: int = 0) -> int: ...

    def reschedule(self, countdown: float, *, reason: str, deferral: bool) -> Retry: ...

    def dead_letter(self, reason: str, error: BaseException | None = None) -> Any: ...


def jittered(seconds: float, cap: float) -> float:
    """`seconds` plus up to 10 % (at least 50 ms) of jitter, capped: deferred tasks spread out."""
    spread = max(0.05, seconds * 0.1)
    return min(cap, max(0.0, seconds) + random.uniform(0.0, spread))


def rejected_reason(error: PolicyRejected) -> str:
    return f"{error.policy} {error.name!r}: {error.reason}"


# -- the guard -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Guard:
    """The policies one task runs through, in this process."""

    breaker: CircuitBreaker | None
    bulkhead: Bulkhead | None
    service: Degradation | None
    budget: RetryBudget | None
    retry: RetryPolicy
    defer_max: int
    defer_cap: float
    client: redis.Redis
    #: Execute-once store, for a task declared `once=True`; None otherwise.
    once: ExecuteOnce | None = None
    #: Seconds a delivery may run (the task time limit and a second): an unfinished one
    #: older than this was interrupted.
    once_window: float = 301.0
    #: This process's held steps (`workers.held`): a success's after-step rides in front
    #: of the next acquire. None: every after-step goes at once.
    held: Held | None = None

    # -- the hot path ----------------------------------------------------------------------

    def run(self, task: GuardedTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.service is not None:
            level = self.service.level()
            if level > self.service.config.run_up_to:
                if task.fallback is not None:
                    return self._fall_back(task, args, kwargs, f"service at level {level}")
                error = ServiceDegraded(
                    self.service.service, str(level), self.service.config.recovery_step
                )
                raise self._defer(task, error)
        once_id = None
        if self.once is not None and not task.request.called_directly:
            claim = self._claim(task)
            if claim.action == "done":
                logger.info("task %s[%s] ran already: its result is returned", task.name,
                            task.request.id)  # fmt: skip
                return claim.result
            if claim.action == "failed":
                raise Interrupted(
                    f"failed already ({claim.reason}); not run again (execute-once): "
                    "replay its dead letter to run it"
                )
            once_id = task.request.id
        try:
            permit = self._permit(task)
            lease = self._lease(task, permit)
        except BaseException:
            if once_id is not None:
                self._abandon(once_id)  # refused before the body ran: a later delivery may run
            raise
        started = time.perf_counter()
        try:
            value = task.run(*args, **kwargs)
        except CONTROL_FLOW:
            self._after(permit, lease, success=True, duration=time.perf_counter() - started,
                        once_id=once_id)  # fmt: skip
            raise
        except Exception as exc:
            counts = self.breaker.classify(exc) if self.breaker is not None else True
            self._after(permit, lease, success=not counts, duration=time.perf_counter() - started,
                        once_id=once_id)  # fmt: skip
            return self._failed(task, exc, args, kwargs)
        self._after(permit, lease, success=True, duration=time.perf_counter() - started,
                    once_id=once_id, result=value)  # fmt: skip
        return value

    # -- execute once ----------------------------------------------------------------------

    def _claim(self, task: GuardedTask) -> Claim:
        """Claim this delivery, or learn that it ran, runs, or was interrupted elsewhere."""
        assert self.once is not None
        try:
            claim = self.once.begin(task.request.id, f"{socket.gethostname()}:{os.getpid()}")
        except redis.RedisError as exc:
            error = AlreadyRunning(task.name, 5.0, f"execute-once store unreachable: {exc}")
            raise self._defer(task, error) from None
        if claim.action != "running":
            return claim
        if claim.age < self.once_window:
            wait = self.once_window - claim.age
            error = AlreadyRunning(
                task.name, wait, f"running on {claim.owner} since {claim.age:.0f} s"
            )
            raise self._defer(task, error)
        reason = (
            f"interrupted: a delivery began on {claim.owner} {claim.age:.0f} s ago and never "
            "finished; not run again (execute-once). Check the dependency, then replay"
        )
        error = Interrupted(reason)
        if not task.request.called_directly:
            task.dead_letter(reason, error)
        raise error

    def _failed_for_good(self, task_id: str, reason: str) -> None:
        assert self.once is not None
        try:
            self.once.fail(task_id, reason)
        except redis.RedisError:
            logger.warning("could not mark %s failed (execute-once)", task_id, exc_info=True)

    def _abandon(self, task_id: str) -> None:
        assert self.once is not None
        try:
            self.once.abandon(task_id)
        except redis.RedisError:
            logger.warning("could not release the execute-once claim of %s", task_id, exc_info=True)

    def _permit(self, task: GuardedTask) -> Permit | None:
        if self.breaker is None:
            return None
        try:
            return self.breaker.acquire()
        except PolicyRejected as error:
            raise self._defer(task, error) from None

    def _lease(self, task: GuardedTask, permit: Permit | None) -> Lease | None:
        if self.bulkhead is None:
            return None
        try:
            if self.held is None:
                return self.bulkhead.try_acquire()
            # Holding `sending`: a release on its way (the flusher's) reaches Redis first.
            with self.held.sending:
                parked = self.held.take(self.bulkhead.name)
                if parked is not None:
                    return parked  # the previous call's permit, still live: no round trip
                if self.held.pending():  # what is held goes first, in this round trip
                    return self.bulkhead.try_acquire(prelude=self.held.prelude)
                return self.bulkhead.try_acquire()
        except PolicyRejected as error:
            if permit is not None and self.breaker is not None:
                # Nothing ran: give a half-open trial slot back, booking no outcome.
                self.breaker.release(permit)
            raise self._defer(task, error) from None

    def _after(
        self,
        permit: Permit | None,
        lease: Lease | None,
        *,
        success: bool,
        duration: float,
        once_id: str | None = None,
        result: Any = _NO_RESULT,
    ) -> None:
        """Book the outcome, free the lease, count the call and settle an execute-once claim:
        one pipelined round trip. After a success it is held for the process's next round
        trip and the lease parked for its next call on the bulkhead (`workers.held`)."""
        step: Step = functools.partial(self._queue_after, permit, lease, success, duration,
                                       once_id, result)  # fmt: skip
        if self.held is None:
            Held(self.client).send(step)
        elif success and once_id is None and (lease is None or not lease.crowded):
            if lease is not None and self.held.parks(lease):
                self.held.park(lease)  # the next call on this bulkhead may take it over
                step = functools.partial(step, parked=True)
            self.held.hold(step)
        else:
            self.held.send(step)

    def _queue_after(
        self,
        permit: Permit | None,
        lease: Lease | None,
        success: bool,
        duration: float,
        once_id: str | None,
        result: Any,
        pipe: redis.client.Pipeline,
        *,
        parked: bool = False,
    ) -> Callable[[Results], None]:
        """Queue the after-step on `pipe`; the returned function reads its replies. A
        `parked` lease is released only if no call took it over, and it was parked
        `HOLD_WITHIN` ago or more (`Held.gives_back`); otherwise the flusher does, when due."""
        once_at = len(pipe)
        if once_id is not None and self.once is not None:
            if result is _NO_RESULT:
                self.once.queue_abandon(pipe, once_id)
            else:
                self.once.queue_finish(pipe, once_id, result)
        once_replies = len(pipe) - once_at
        record = (
            self.breaker.record_in(pipe, permit, success, duration)
            if permit is not None and self.breaker is not None
            else None
        )
        release = (
            self.bulkhead.release_in(pipe, lease)
            if lease is not None
            and self.bulkhead is not None
            and (not parked or self.held is None or self.held.gives_back(lease))
            else None
        )
        counted = self.budget.count_call_in(pipe) if self.budget is not None else None

        def settle(results: Results) -> None:
            if record is not None:
                record.settle(results)
            if release is not None:
                release.finish(results)
            if counted is not None:
                counted.settle(results)  # re-run after NOSCRIPT; kept locally if Redis failed
            if once_replies:
                self._settled_once(once_id, results, once_at, once_replies, result is _NO_RESULT)

        return settle

    def _settled_once(
        self,
        once_id: str | None,
        results: Results,
        at: int,
        count: int,
        abandoned: bool,
    ) -> None:
        """A failed execute-once write is said (and a failed release tried again)."""
        replies = [results] if isinstance(results, BaseException) else results[at : at + count]
        errors = [r for r in replies if isinstance(r, BaseException)]
        if not errors or once_id is None:
            return
        if abandoned:
            logger.warning("execute-once claim of %s not released (%s); trying again", once_id,
                           errors[0])  # fmt: skip
            self._abandon(once_id)
        else:
            logger.error("execute-once result of %s not recorded: %s", once_id, errors[0])

    # -- when the job cannot run now, or failed ----------------------------------------------

    def _defer(self, task: GuardedTask, error: PolicyRejected) -> BaseException:
        """Re-send the task for when it may pass; past the deferral budget, dead-letter it."""
        reason = rejected_reason(error)
        if task.request.called_directly:
            return error
        deferrals = task.header(DEFERRALS_HEADER)
        if deferrals >= self.defer_max:
            task.dead_letter(f"deferred {deferrals} times, still refused: {reason}", error)
            return error
        countdown = jittered(error.retry_after, self.defer_cap)
        events.default_emitter.emit(
            events.TaskDeferred(
                policy=error.policy,
                name=error.name,
                task_name=task.name,
                task_id=task.request.id,
                countdown=countdown,
                deferrals=deferrals + 1,
                reason=reason,
            )
        )
        return task.reschedule(countdown, reason=f"deferred: {reason}", deferral=True)

    def _failed(
        self, task: GuardedTask, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        attempt = task.header(ATTEMPT_HEADER, 1)
        decision = self.retry.decide(exc, attempt)
        kind = decision.classification.kind
        fall_back_on = (
            self.service.config.fall_back_on
            if self.service is not None
            else frozenset({FailureKind.degraded})
        )
        if task.fallback is not None and kind in fall_back_on:
            return self._fall_back(task, args, kwargs, decision.reason)
        if decision.action == "retry" and decision.countdown is not None:
            if task.request.called_directly:
                raise exc
            if self.budget is not None and not self.budget.try_spend():
                state = self.budget.snapshot()
                raise self._defer(task, RetryBudgetExhausted(self.budget.name, state.retry_after))
            events.default_emitter.emit(
                events.TaskRetried(
                    policy="retry",
                    name=task.name,
                    task_name=task.name,
                    task_id=task.request.id,
                    attempt=attempt,
                    countdown=decision.countdown,
                    failure=str(kind),
                    reason=decision.reason,
                )
            )
            raise task.reschedule(decision.countdown, reason=decision.reason, deferral=False)
        if decision.action == "fallback" and task.fallback is not None:
            return self._fall_back(task, args, kwargs, decision.reason)
        if not task.request.called_directly:
            task.dead_letter(decision.reason, exc)
            if self.once is not None:
                self._failed_for_good(task.request.id, decision.reason)
        raise exc

    def _fall_back(
        self, task: GuardedTask, args: tuple[Any, ...], kwargs: dict[str, Any], why: str
    ) -> Any:
        assert task.fallback is not None
        events.default_emitter.emit(
            events.TaskFellBack(
                policy="degradation",
                name=self.service.service if self.service is not None else task.name,
                task_name=task.name,
                task_id=task.request.id,
                status="fallback",
            )
        )
        logger.info("task %s answered by its fallback: %s", task.name, why)
        return task.fallback(*args, **kwargs)


def build_guard(task: GuardedTask, settings: Settings) -> Guard:
    """The policies `task` declares, built for this process, and the settings' retry rules."""
    listeners.ensure()
    r = settings.resilience
    budget = task.budget if task.budget is not None else task.breaker
    return Guard(
        breaker=policy("breaker", task.breaker) if task.breaker else None,
        bulkhead=policy("bulkhead", task.bulkhead) if task.bulkhead else None,
        service=policy("service", task.service) if task.service else None,
        budget=policy("budget", budget) if budget else None,
        retry=RetryPolicy.from_settings(
            max_attempts=r.retry_max_attempts,
            base_delay=r.retry_base_delay,
            max_delay=r.retry_max_delay,
        ),
        defer_max=r.defer_max if task.defer_max is None else task.defer_max,
        defer_cap=r.defer_max_delay,
        client=policy_redis(),
        once=ExecuteOnce(policy_redis()) if task.once else None,
        held=held(),
        once_window=settings.scaling.task_time_limit + 1.0,
    )


_guards: PerProcess[Guard] = PerProcess()


def guard_for(task: GuardedTask) -> Guard:
    """The guard of `task` in this process (built on its first run, after fork)."""
    return _guards.get(task.name, lambda: build_guard(task, get_settings()))


def forget_guards() -> None:
    """Drop built guards (tests that change settings)."""
    _guards.clear()


__all__ = [
    "ATTEMPT_HEADER",
    "DEFERRALS_HEADER",
    "Guard",
    "GuardedTask",
    "build_guard",
    "forget_guards",
    "guard_for",
    "jittered",
    "rejected_reason",
]
