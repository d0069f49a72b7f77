"""`ResilientTask`: the Celery task base class that runs a job through the shared policies.

    @app.task(base=ResilientTask, name="payments.charge",
              breaker="payments", bulkhead="payments", service="payments")
    def charge(order_id, amount_cents): ...

Around `run()`: degradation level (local cache) -> breaker permit (local cache
when closed) -> bulkhead lease (one Redis round trip) -> run -> breaker outcome
and lease release (one pipelined round trip).

What happens when the job cannot run now or fails:

- an open breaker, a full bulkhead or a service level that refuses the call
  DEFERS the task: it is re-sent with a countdown to when it may pass (plus
  jitter), counted in its own deferral budget (`defer_max`), not in its
  retries; past the budget it is dead-lettered;
- a failure is classified (transient, timeout, rate-limited, permanent,
  degraded) and the retry policy decides: retry with a countdown (the worker
  slot is freed, nothing sleeps), the task's fallback, or the dead-letter
  store with the reason;
- retries spend the dependency's fleet-wide retry budget; when it is spent
  the task is deferred instead of hammering the dependency.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import redis
from celery import Task
from celery.exceptions import Reject, Retry

from policies import events
from policies.deadletter import DeadLetter
from policies.errors import PolicyConfigError
from workers.amqp import BROKER_ERRORS
from workers.guard import ATTEMPT_HEADER, DEFERRALS_HEADER, guard_for
from workers.registry import registry
from workers.resources import deadletters
from workers.security import sealed

logger = logging.getLogger(__name__)

#: What a publish raises when the broker is away.
_UNSENT = (*BROKER_ERRORS, redis.ConnectionError, redis.TimeoutError)
#: Seconds before a task whose dead-lettering failed (store unreachable) comes back.
DEADLETTER_RETRY = 5.0

#: Options `app.task(...)` accepts that are not attributes of `celery.Task`.
_DECORATOR_OPTIONS = frozenset({"name", "base", "bind", "shared", "filter", "lazy"})


class ResilientTask(Task):  # type: ignore[misc]
    """A Celery task whose run goes through breaker, bulkhead, degradation and retry policies."""

    abstract = True
    #: No argument check in `apply_async`: a re-send (deferral, retry, dead-letter store
    #: unreachable) must carry the arguments as they came, even ones that do not fit the
    #: job (they fail as a permanent error and are dead-lettered, not raised at re-send).
    typing = False
    #: Names of declared policies (see `workers.registry`); None: not used.
    breaker: str | None = None
    bulkhead: str | None = None
    service: str | None = None
    #: Retry budget name; defaults to the breaker's name (one budget per dependency,
    #: declared with the settings' defaults if the catalogue declares none).
    budget: str | None = None
    #: Called with the task's arguments when the service refuses the call or a
    #: failure is classified "degraded"; its return value becomes the result.
    fallback: Callable[..., Any] | None = None
    #: Deferrals before dead-lettering; None: the settings' BULWARK_DEFER_MAX.
    defer_max: int | None = None
    #: Not idempotent: run at most once per task id, fleet-wide (`policies.once`). A
    #: redelivery returns the first run's result; one whose first run was interrupted
    #: is dead-lettered, not run again.
    once: bool = False

    POLICY_OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"breaker", "bulkhead", "service", "budget", "fallback", "defer_max", "once"}
    )

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse unknown options and undeclared policy names, at decoration time."""
        unknown = sorted(
            k
            for k in options
            if k not in cls.POLICY_OPTIONS and k not in _DECORATOR_OPTIONS and not hasattr(Task, k)
        )
        if unknown:
            raise PolicyConfigError(
                f"unknown task option(s) {', '.join(unknown)}; "
                f"policy options are {', '.join(sorted(cls.POLICY_OPTIONS))}"
            )
        for kind in ("breaker", "bulkhead", "service", "budget"):
            name = options.get(kind)
            if name is not None:
                registry.require(kind, name)
        if options.get("budget") is None and options.get("breaker") is not None:
            registry.ensure("budget", options["breaker"])
        fallback = options.get("fallback")
        if fallback is not None and not callable(fallback):
            raise PolicyConfigError(f"fallback must be callable, got {fallback!r}")
        if not isinstance(options.get("once", False), bool):
            raise PolicyConfigError(f"once must be True or False, got {options['once']!r}")
        defer_max = options.get("defer_max")
        if defer_max is not None and (not isinstance(defer_max, int) or defer_max < 0):
            raise PolicyConfigError(f"defer_max must be an int >= 0, got {defer_max!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return guard_for(self).run(self, args, kwargs)

    # -- rescheduling, shared by deferral and retry ---------------------------------------

    def header(self, name: str, default: int = 0) -> int:
        headers = self.request.headers or {}
        value = headers.get(name, getattr(self.request, name, None))
        try:
            return int(value) if value is not None else default
        except (TypeError, ValueError):
            return default

    def reschedule(self, countdown: float, *, reason: str, deferral: bool) -> Retry:
        """Re-send this task with `countdown`; the returned `Retry` must be raised.

        A deferral keeps the Celery retry count and bumps the deferral count;
        a retry bumps both the Celery retry count and Bulwark's attempt.
        """
        request = self.request
        headers = dict(request.headers or {})
        if deferral:
            headers[DEFERRALS_HEADER] = self.header(DEFERRALS_HEADER) + 1
        else:
            headers[ATTEMPT_HEADER] = self.header(ATTEMPT_HEADER, 1) + 1
        retries = request.retries + (0 if deferral else 1)
        signature = self.signature_from_request(
            request, countdown=countdown, retries=retries, headers=headers
        )
        try:
            signature.apply_async()
        except _UNSENT as exc:
            # The broker is away (after the publish retries): this message goes back on its
            # queue as it is, to run again once the broker answers, never stored as FAILURE.
            logger.warning("could not re-send %s (%s: %s); it goes back on its queue",
                           request.id, type(exc).__name__, exc)  # fmt: skip
            raise Reject(f"re-send failed: {exc}", requeue=True) from exc
        return Retry(reason, None, when=countdown)

    def dead_letter(self, reason: str, error: BaseException | None = None) -> DeadLetter:
        """Keep this task in the dead-letter store with `reason`.

        If the store cannot be reached the task is not lost: it is re-sent with
        a countdown (a deferral), and comes back here once the store answers.
        """
        try:
            return self._store_dead_letter(reason, error)
        except redis.RedisError as exc:
            logger.error("dead-letter store unreachable (%s); deferring %s", exc, self.request.id)
            raise self.reschedule(
                DEADLETTER_RETRY, reason=f"dead-letter store unreachable: {reason}", deferral=True
            ) from exc

    def _store_dead_letter(self, reason: str, error: BaseException | None) -> DeadLetter:
        request = self.request
        args, kwargs = list(request.args or ()), dict(request.kwargs or {})
        said = f"{type(error).__name__}: {error}" if error is not None else None
        if sealed.encrypted(self.name):  # kept sealed at rest; error and reason may quote them
            kept = {"args": args, "kwargs": kwargs, "error": said, "reason": reason}
            args, kwargs = [], sealed.seal_value(kept, self.name, request.id, "deadletter")
            said = f"{type(error).__name__}: (sealed)" if error is not None else None
            reason = f"{reason.split(':', 1)[0]}: (sealed)"
        letter = deadletters().add(
            DeadLetter(
                task_name=self.name,
                task_id=request.id,
                queue=(request.delivery_info or {}).get("routing_key"),
                args=args,
                kwargs=kwargs,
                reason=reason,
                error=said,
                attempts=self.header(ATTEMPT_HEADER, 1),
            )
        )
        events.default_emitter.emit(
            events.TaskDeadLettered(
                policy="task",
                name=self.name,
                task_name=self.name,
                task_id=request.id,
                reason=reason,
            )
        )
        return letter
