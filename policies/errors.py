"""The one error hierarchy of Bulwark's policies.

Each error carries what a caller needs to act on it, above all `retry_after`:
the seconds after which the same call may pass.
"""

from __future__ import annotations


class BulwarkError(Exception):
    """Base of every error a Bulwark policy raises."""


class PolicyRejected(BulwarkError):
    """A policy refused a call for now; it may pass after `retry_after` seconds."""

    def __init__(self, policy: str, name: str, retry_after: float, reason: str) -> None:
        self.policy = policy
        self.name = name
        self.retry_after = max(0.0, retry_after)
        self.reason = reason
        super().__init__(
            f"{policy} {name!r} rejected the call: {reason} (retry after {self.retry_after:.3f} s)"
        )


class CircuitOpen(PolicyRejected):
    """The breaker is open (or its half-open trials are taken)."""

    def __init__(self, name: str, retry_after: float, state: str = "open") -> None:
        self.state = state
        super().__init__("breaker", name, retry_after, f"circuit {state}")


class BulkheadFull(PolicyRejected):
    """Every permit of the bulkhead is held."""

    def __init__(self, name: str, retry_after: float, limit: int) -> None:
        self.limit = limit
        super().__init__("bulkhead", name, retry_after, f"all {limit} permits held")


class ServiceDegraded(PolicyRejected):
    """The service's degradation level does not allow this call."""

    def __init__(self, name: str, level: str, retry_after: float) -> None:
        self.level = level
        super().__init__("degradation", name, retry_after, f"service at level {level}")


class RetryBudgetExhausted(PolicyRejected):
    """Retries for this dependency are over their share of calls."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__("retry-budget", name, retry_after, "retry budget exhausted")


class PolicyConfigError(BulwarkError, ValueError):
    """A policy was declared with an unknown name or an invalid option."""


class PermanentFailure(BulwarkError):
    """A failure that retrying cannot fix; the task goes to the dead-letter queue."""


class TransientFailure(BulwarkError):
    """A failure worth retrying (the dependency may recover)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class AlreadyRunning(PolicyRejected):
    """An execute-once task is running elsewhere (or its store cannot be asked): try later."""

    def __init__(self, name: str, retry_after: float, reason: str) -> None:
        super().__init__("once", name, retry_after, reason)


class Interrupted(PermanentFailure):
    """An execute-once task's earlier delivery began and never finished: it is not run again."""
