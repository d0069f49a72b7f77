"""Failure classification: what kind of failure an exception is, and when to try again.

The exception's TYPE decides first (your registered rules, then Bulwark's
own errors, timeouts, HTTP status codes read from common attributes, network
errors, programming/input errors); the cause chain next; the message text
only as a last resort. The answer is a frozen `Classification`.
"""

from __future__ import annotations

import email.utils
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from policies import errors


class FailureKind(StrEnum):
    """What went wrong, as far as retrying is concerned."""

    transient = "transient"
    timeout = "timeout"
    rate_limited = "rate_limited"
    permanent = "permanent"
    degraded = "degraded"


@dataclass(frozen=True, slots=True, kw_only=True)
class Classification:
    """The kind of a failure, the Retry-After it carried (seconds) and why."""

    kind: FailureKind
    retry_after: float | None = None
    reason: str = ""


Predicate = Callable[[BaseException], bool]

#: OSErrors that are about the local machine or the input, not the network.
_LOCAL_OS_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
_TIMEOUT_ERRNOS = {errno.ETIMEDOUT}
_PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    NotImplementedError,
    AssertionError,
)
#: Last resort: (substring of the lower-cased message, kind).
_MESSAGES: tuple[tuple[str, FailureKind], ...] = (
    ("timed out", FailureKind.timeout),
    ("timeout", FailureKind.timeout),
    ("too many requests", FailureKind.rate_limited),
    ("rate limit", FailureKind.rate_limited),
    ("temporarily unavailable", FailureKind.transient),
    ("service unavailable", FailureKind.transient),
    ("try again", FailureKind.transient),
    ("connection reset", FailureKind.transient),
    ("connection refused", FailureKind.transient),
)


def _int_status(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (status_code, status, response.*, int code)."""
    response = getattr(exc, "response", None)
    for holder, attr in (
        (exc, "status_code"),
        (exc, "status"),
        (response, "status_code"),
        (response, "status"),
        (exc, "code"),
    ):
        if holder is not None:
            status = _int_status(getattr(holder, attr, None))
            if status is not None:
                return status
    return None


def parse_retry_after(value: Any, now: float | None = None) -> float | None:
    """Seconds from a Retry-After value: a number of seconds or an HTTP-date."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return max(0.0, float(value))
    text = value.decode() if isinstance(value, bytes) else str(value)
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _header(headers: Any, name: str) -> Any:
    if headers is None:
        return None
    try:
        value = headers.get(name)
        if value is None:
            value = headers.get(name.lower())
    except (AttributeError, TypeError):
        return None
    return value


def retry_after_of(exc: BaseException, now: float | None = None) -> float | None:
    """Retry-After carried by an exception (retry_after attribute or a response/headers)."""
    direct = getattr(exc, "retry_after", None)
    if direct is not None:
        return parse_retry_after(direct, now)
    response = getattr(exc, "response", None)
    for headers in (getattr(response, "headers", None), getattr(exc, "headers", None)):
        value = _header(headers, "Retry-After")
        if value is not None:
            return parse_retry_after(value, now)
    return None


def _is_timeout_type(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TIMEOUT_ERRNOS:
        return True
    return any("Timeout" in cls.__name__ for cls in type(exc).__mro__)


def _is_network_type(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | EOFError):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, _LOCAL_OS_ERRORS):
        return True
    return any(
        "ConnectionError" in cls.__name__ or "ConnectError" in cls.__name__
        for cls in type(exc).__mro__
    )


class Classifier:
    """Classifies exceptions; rules you register win over the built-in table.

    `register(ExcType, kind)` matches by type (the most specific registered
    class in the exception's MRO wins); `register_predicate(fn, kind)` rules
    are tried next, in registration order.
    """

    def __init__(
        self,
        *,
        default: FailureKind = FailureKind.transient,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.default = default
        self._now = now
        self._types: dict[type[BaseException], FailureKind] = {}
        self._predicates: list[tuple[Predicate, FailureKind, str]] = []

    def register(self, exc_type: type[BaseException], kind: FailureKind | str) -> None:
        """Classify `exc_type` (and subclasses) as `kind`."""
        self._types[exc_type] = FailureKind(kind)

    def register_predicate(
        self, predicate: Predicate, kind: FailureKind | str, *, name: str = ""
    ) -> None:
        """Classify exceptions for which `predicate(exc)` is true as `kind`."""
        label = name or getattr(predicate, "__name__", repr(predicate))
        self._predicates.append((predicate, FailureKind(kind), label))

    def __call__(self, exc: BaseException) -> Classification:
        return self.classify(exc)

    def classify(self, exc: BaseException) -> Classification:
        """The kind of `exc`: by type, then its causes, then its message, else the default."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen and len(seen) < 5:
            seen.add(id(current))
            found = self._by_type(current)
            if found is not None:
                if current is not exc:
                    return Classification(
                        kind=found.kind,
                        retry_after=found.retry_after,
                        reason=f"caused by {found.reason}",
                    )
                return found
            current = current.__cause__ or current.__context__
        return self._by_message(exc)

    def _with_retry_after(
        self, exc: BaseException, kind: FailureKind, reason: str
    ) -> Classification:
        after = retry_after_of(exc, self._now())
        if after is not None:
            reason = f"{reason}, Retry-After {after:g} s"
        return Classification(kind=kind, retry_after=after, reason=reason)

    def _registered(self, exc: BaseException) -> Classification | None:
        name = type(exc).__name__
        for cls in type(exc).__mro__:
            kind = self._types.get(cls)
            if kind is not None:
                return self._with_retry_after(exc, kind, f"{name}: registered as {kind}")
        for predicate, kind, label in self._predicates:
            if predicate(exc):
                return self._with_retry_after(exc, kind, f"{name}: matched rule {label} ({kind})")
        return None

    def _by_type(self, exc: BaseException) -> Classification | None:
        registered = self._registered(exc)
        if registered is not None:
            return registered
        name = type(exc).__name__
        if isinstance(exc, errors.PermanentFailure):
            return Classification(kind=FailureKind.permanent, reason=f"{name}: {exc}")
        if isinstance(exc, errors.ServiceDegraded):
            return Classification(
                kind=FailureKind.degraded, retry_after=exc.retry_after, reason=str(exc)
            )
        if isinstance(exc, errors.TransientFailure | errors.PolicyRejected):
            return self._with_retry_after(exc, FailureKind.transient, f"{name}: {exc}")
        if _is_timeout_type(exc):
            return Classification(kind=FailureKind.timeout, reason=f"{name}: timed out")
        status = http_status(exc)
        if status is not None:
            return self._by_status(exc, status)
        if _is_network_type(exc):
            return Classification(kind=FailureKind.transient, reason=f"{name}: network error")
        if isinstance(exc, (*_PROGRAMMING_ERRORS, *_LOCAL_OS_ERRORS)):
            return Classification(
                kind=FailureKind.permanent,
                reason=f"{name}: a programming or input error, retrying cannot fix it",
            )
        return None

    def _by_status(self, exc: BaseException, status: int) -> Classification | None:
        if status == 429:
            return self._with_retry_after(exc, FailureKind.rate_limited, "HTTP 429 rate limited")
        if status == 408:
            return Classification(kind=FailureKind.timeout, reason="HTTP 408 request timeout")
        if 400 <= status < 500:
            return Classification(
                kind=FailureKind.permanent,
                reason=f"HTTP {status}: client error, retrying cannot fix it",
            )
        if status >= 500:
            return self._with_retry_after(exc, FailureKind.transient, f"HTTP {status} server error")
        return None

    def _by_message(self, exc: BaseException) -> Classification:
        text = str(exc).lower()
        for needle, kind in _MESSAGES:
            if needle in text:
                return Classification(
                    kind=kind, reason=f"{type(exc).__name__}: message says {needle!r}"
                )
        return Classification(
            kind=self.default,
            reason=f"{type(exc).__name__}: unclassified, treated as {self.default}",
        )


#: The process-wide classifier; register your own exception types on it.
default_classifier = Classifier()


def classify(exc: BaseException) -> Classification:
    """Classify `exc` with the default classifier."""
    return default_classifier.classify(exc)
