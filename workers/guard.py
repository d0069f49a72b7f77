"""The policies of one `ResilientTask` in one worker process, and the hot path through them.

Before the body: the degradation level and the breaker come from local caches
kept fresh by pub/sub (no round trip while the change feed is healthy); the
bulkhead lease is one Redis round trip. After the body: the breaker outcome,
the lease release and the retry budget's call count go out in ONE pipeline.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery.exceptions import Ignore, Reject, Retry

from policies import events
from policies.breaker import CircuitBreaker, Permit, RedisBreakerStore
from policies.breaker.config import BreakerConfig, consecutive_failures
from policies.budget import BudgetConfig, RedisBudgetStore, RetryBudget
from policies.bulkhead import Bulkhead, BulkheadConfig, Lease
from policies.classify import FailureKind
from policies.degradation import Degradation, DegradationConfig
from policies.degradation.store import RedisDegradationStore
from policies.errors import PolicyRejected, RetryBudgetExhausted, ServiceDegraded
from policies.retry import RetryPolicy
from workers.eventlog import log_event
from workers.registry import Declaration, registry
from workers.resources import policy_redis
from workers.settings import Settings, get_settings
from workers.task import ATTEMPT_HEADER, DEFERRALS_HEADER, ResilientTask, jittered, rejected_reason

logger = logging.getLogger(__name__)

#: Celery's own control flow raised from a task body: not a failure of the dependency.
CONTROL_FLOW = (Retry, Ignore, Reject)


# -- building policies from declarations + settings ------------------------------------------


def build_breaker(decl: Declaration) -> CircuitBreaker:
    r = get_settings().resilience
    options: dict[str, Any] = {
        "trip": consecutive_failures(r.breaker_failure_threshold),
        "open_timeout": r.breaker_timeout,
        "max_open_timeout": max(r.breaker_timeout, 300.0),
        "success_threshold": r.breaker_success_threshold,
        **decl.overrides,
    }
    config = BreakerConfig.from_mapping(options)
    return CircuitBreaker(decl.name, config, RedisBreakerStore(policy_redis()))


def build_bulkhead(decl: Declaration) -> Bulkhead:
    options = {"limit": get_settings().resilience.bulkhead_max_concurrent, **decl.overrides}
    return Bulkhead(decl.name, policy_redis(), BulkheadConfig.from_mapping(options))


def build_service(decl: Declaration) -> Degradation:
    r = get_settings().resilience
    options = {
        "enabled": r.degradation_enabled,
        "recovery_step": r.degradation_recovery_step,
        **decl.overrides,
    }
    config = DegradationConfig(**options)
    return Degradation(decl.name, RedisDegradationStore(policy_redis()), config)


def build_budget(decl: Declaration) -> RetryBudget:
    r = get_settings().resilience
    options = {
        "ratio": r.retry_budget_ratio,
        "window": r.retry_budget_window,
        "min_retries": r.retry_budget_min,
        **decl.overrides,
    }
    return RetryBudget(decl.name, BudgetConfig(**options), store=RedisBudgetStore(policy_redis()))


BUILDERS = {
    "breaker": build_breaker,
    "bulkhead": build_bulkhead,
    "service": build_service,
    "budget": build_budget,
}


def policy(kind: str, name: str) -> Any:
    """The process-wide policy object of `kind` `name` (built on first use, after fork)."""
    return registry.build(kind, name, BUILDERS[kind])


OPEN_STATES = frozenset({"open", "half_open", "forced_open"})


def observe_service(name: str, *, breaker_open: bool | None = None) -> str | None:
    """Apply the automatic degradation rule to service `name` from its breaker's state.

    The breaker and the service of one dependency share its name. Returns the
    new level if it changed.
    """
    service: Degradation = policy("service", name)
    failures = 0
    if breaker_open is None and any(d.name == name for d in registry.declared("breaker")):
        snapshot = policy("breaker", name).snapshot()
        breaker_open = snapshot.state in OPEN_STATES
        failures = snapshot.window_failures
    state = service.observe(breaker_open=bool(breaker_open), failures=failures)
    return str(state.level) if state is not None and state.changed else None


def observe_services() -> dict[str, Any]:
    """`observe_service` for every declared service: what the beat tick runs."""
    changes = {}
    for decl in registry.declared("service"):
        changed = observe_service(decl.name)
        if changed is not None:
            changes[decl.name] = changed
    return changes


def degrade_on_breaker(event: events.Event) -> None:
    """Listener: a breaker of a declared service opened or closed -> re-assess the service now."""
    if not isinstance(event, events.BreakerTransition):
        return
    if any(d.name == event.name for d in registry.declared("service")):
        observe_service(event.name, breaker_open=event.to_state in OPEN_STATES)


_listening = threading.Lock()
_listeners_on = False


def ensure_listeners() -> None:
    """Subscribe the worker-side listeners to policy events, once per process."""
    global _listeners_on
    with _listening:
        if not _listeners_on:
            events.default_emitter.subscribe(log_event)
            events.default_emitter.subscribe(degrade_on_breaker)
            _listeners_on = True


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

    # -- the hot path ----------------------------------------------------------------------

    def run(self, task: ResilientTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.service is not None:
            level = self.service.level()
            if level > self.service.config.run_up_to:
                if task.fallback is not None:
                    return self._fall_back(task, args, kwargs, f"service at level {level}")
                error = ServiceDegraded(
                    self.service.service, str(level), self.service.config.recovery_step
                )
                raise self._defer(task, error)
        permit = self._permit(task)
        lease = self._lease(task, permit)
        started = time.perf_counter()
        try:
            value = task.run(*args, **kwargs)
        except CONTROL_FLOW:
            self._after(permit, lease, success=True, duration=time.perf_counter() - started)
            raise
        except Exception as exc:
            counts = self.breaker.classify(exc) if self.breaker is not None else True
            self._after(permit, lease, success=not counts, duration=time.perf_counter() - started)
            return self._failed(task, exc, args, kwargs)
        self._after(permit, lease, success=True, duration=time.perf_counter() - started)
        return value

    def _permit(self, task: ResilientTask) -> Permit | None:
        if self.breaker is None:
            return None
        try:
            return self.breaker.acquire()
        except PolicyRejected as error:
            raise self._defer(task, error) from None

    def _lease(self, task: ResilientTask, permit: Permit | None) -> Lease | None:
        if self.bulkhead is None:
            return None
        try:
            return self.bulkhead.try_acquire()
        except PolicyRejected as error:
            if permit is not None and self.breaker is not None:
                # Nothing ran: give a half-open trial slot back, booking no outcome.
                self.breaker.release(permit)
            raise self._defer(task, error) from None

    def _after(
        self, permit: Permit | None, lease: Lease | None, *, success: bool, duration: float
    ) -> None:
        """Book the outcome, free the lease and count the call: one pipelined round trip."""
        pipe = self.client.pipeline(transaction=False)
        record = (
            self.breaker.record_in(pipe, permit, success, duration)
            if permit is not None and self.breaker is not None
            else None
        )
        release = self.bulkhead.release_in(pipe, lease) if lease is not None else None
        counted = self.budget.queue_record_call(pipe) if self.budget is not None else None
        if not len(pipe):
            return
        results: list[Any] | BaseException
        try:
            results = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            results = exc
        if record is not None:
            record.settle(results)
        if release is not None:
            release.finish(results)
        if counted is not None:
            counted.reply(results)  # re-runs the count if Redis lost its scripts (a restart)

    # -- when the job cannot run now, or failed ----------------------------------------------

    def _defer(self, task: ResilientTask, error: PolicyRejected) -> BaseException:
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
        self, task: ResilientTask, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
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
        raise exc

    def _fall_back(
        self, task: ResilientTask, args: tuple[Any, ...], kwargs: dict[str, Any], why: str
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


def _build_guard(task: ResilientTask, settings: Settings) -> Guard:
    ensure_listeners()
    r = settings.resilience
    budget_name = task.budget
    return Guard(
        breaker=policy("breaker", task.breaker) if task.breaker else None,
        bulkhead=policy("bulkhead", task.bulkhead) if task.bulkhead else None,
        service=policy("service", task.service) if task.service else None,
        budget=policy("budget", budget_name) if budget_name else None,
        retry=RetryPolicy.from_settings(
            max_attempts=r.retry_max_attempts,
            base_delay=r.retry_base_delay,
            max_delay=r.retry_max_delay,
        ),
        defer_max=r.defer_max if task.defer_max is None else task.defer_max,
        defer_cap=r.defer_max_delay,
        client=policy_redis(),
    )


@functools.cache
def _guard(task_name: str, pid: int) -> Guard:
    from workers.app import app

    return _build_guard(app.tasks[task_name], get_settings())


def guard_for(task: ResilientTask) -> Guard:
    """The guard of `task` in this process (built on its first run, after fork)."""
    return _guard(task.name, os.getpid())


__all__ = ["Guard", "guard_for", "observe_services", "policy"]
