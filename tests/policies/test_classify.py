"""Failure classification: the table of exception types, HTTP statuses and Retry-After."""

from __future__ import annotations

import email.utils
import socket
import urllib.error
from types import SimpleNamespace
from typing import Any

import pytest

from policies import errors
from policies.classify import (
    Classification,
    Classifier,
    FailureKind,
    classify,
    http_status,
    parse_retry_after,
)

NOW = 1_700_000_000.0


class HTTPError(Exception):
    """An HTTP error shaped like requests/httpx: status on .response."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.response = SimpleNamespace(status_code=status, headers=headers or {})


class StatusError(Exception):
    def __init__(self, **attrs: Any) -> None:
        super().__init__("boom")
        for name, value in attrs.items():
            setattr(self, name, value)


class ReadTimeout(Exception):
    """Named like requests' and httpx's timeouts."""


class ConnectError(Exception):
    """Named like httpx.ConnectError."""


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(NOW + seconds_from_now, usegmt=True)


K = FailureKind
TABLE: list[tuple[BaseException, FailureKind, float | None]] = [
    (TimeoutError("x"), K.timeout, None),
    (socket.timeout("x"), K.timeout, None),  # noqa: UP041 (the old alias)
    (ReadTimeout("x"), K.timeout, None),
    (OSError(110, "Connection timed out"), K.timeout, None),
    (ConnectionRefusedError("x"), K.transient, None),
    (ConnectionResetError("x"), K.transient, None),
    (ConnectError("x"), K.transient, None),
    (socket.gaierror("x"), K.transient, None),
    (OSError("network is unreachable"), K.transient, None),
    (FileNotFoundError("x"), K.permanent, None),
    (HTTPError(429, {"Retry-After": "7"}), K.rate_limited, 7.0),
    (HTTPError(429, {"retry-after": http_date(30)}), K.rate_limited, 30.0),
    (HTTPError(429), K.rate_limited, None),
    (HTTPError(408), K.timeout, None),
    (HTTPError(404), K.permanent, None),
    (HTTPError(400), K.permanent, None),
    (HTTPError(500), K.transient, None),
    (HTTPError(503, {"Retry-After": "2.5"}), K.transient, 2.5),
    (StatusError(status_code=502), K.transient, None),
    (StatusError(status=403), K.permanent, None),
    (StatusError(code=429, retry_after=3), K.rate_limited, 3.0),
    (StatusError(code=429, headers={"Retry-After": "4"}), K.rate_limited, 4.0),
    (StatusError(code="E_WEIRD"), K.transient, None),
    (
        urllib.error.HTTPError("http://x", 429, "slow", {"Retry-After": "9"}, None),
        K.rate_limited,
        9.0,
    ),  # type: ignore[arg-type]
    (urllib.error.HTTPError("http://x", 410, "gone", {}, None), K.permanent, None),  # type: ignore[arg-type]
    (errors.PermanentFailure("bad card"), K.permanent, None),
    (errors.TransientFailure("busy", retry_after=5.0), K.transient, 5.0),
    (errors.TransientFailure("busy"), K.transient, None),
    (errors.ServiceDegraded("pay", "minimal", 1.0), K.degraded, 1.0),
    (errors.CircuitOpen("pay", 12.0), K.transient, 12.0),
    (ValueError("x"), K.permanent, None),
    (TypeError("x"), K.permanent, None),
    (KeyError("x"), K.permanent, None),
    (RuntimeError("the operation timed out"), K.timeout, None),
    (RuntimeError("resource temporarily unavailable"), K.transient, None),
    (RuntimeError("too many requests, slow down"), K.rate_limited, None),
    (RuntimeError("no idea"), K.transient, None),
]


class TestClassificationTable:
    """Each exception lands in its kind, with the Retry-After it carried."""

    @pytest.mark.parametrize(
        ("exc", "kind", "after"), TABLE, ids=[f"{type(e).__name__}-{e}" for e, _, _ in TABLE]
    )
    def test_kind_and_retry_after(
        self, exc: BaseException, kind: FailureKind, after: float | None
    ) -> None:
        found = Classifier(now=lambda: NOW).classify(exc)
        assert found.kind is kind, found.reason
        if after is None:
            assert found.retry_after is None
        else:
            assert found.retry_after == pytest.approx(after, abs=1.0)
        # The reason names the failure: its type, its own message or its HTTP status.
        named = [type(exc).__name__, str(exc), f"HTTP {http_status(exc)}"]
        assert any(n and n in found.reason for n in named), found.reason

    def test_type_beats_message(self) -> None:
        found = classify(ValueError("connection timed out while parsing"))
        assert found.kind is FailureKind.permanent

    def test_cause_chain_is_followed(self) -> None:
        try:
            try:
                raise TimeoutError("inner")
            except TimeoutError as inner:
                raise RuntimeError("wrapper") from inner
        except RuntimeError as exc:
            found = classify(exc)
        assert found.kind is FailureKind.timeout
        assert found.reason.startswith("caused by")

    def test_result_is_frozen(self) -> None:
        found = classify(TimeoutError())
        with pytest.raises(AttributeError):
            found.kind = FailureKind.permanent  # type: ignore[misc]
        assert found == Classification(kind=FailureKind.timeout, reason="TimeoutError: timed out")


class TestClassifierRules:
    """Registered rules win over the built-in table; the most specific type wins."""

    def test_registered_type_overrides_builtin(self) -> None:
        classifier = Classifier()
        classifier.register(KeyError, FailureKind.transient)
        assert classifier.classify(KeyError("cache miss")).kind is FailureKind.transient
        assert classifier.classify(IndexError("x")).kind is FailureKind.permanent

    def test_most_specific_registered_type_wins(self) -> None:
        classifier = Classifier()
        classifier.register(Exception, "permanent")
        classifier.register(ConnectionError, "rate_limited")
        assert classifier.classify(ConnectionResetError()).kind is FailureKind.rate_limited
        assert classifier.classify(RuntimeError()).kind is FailureKind.permanent

    def test_predicate_rule(self) -> None:
        classifier = Classifier()
        classifier.register_predicate(lambda e: "quota" in str(e), "rate_limited", name="quota")
        found = classifier.classify(RuntimeError("quota exceeded"))
        assert found.kind is FailureKind.rate_limited
        assert "quota" in found.reason

    def test_default_kind_is_configurable(self) -> None:
        assert Classifier(default=FailureKind.permanent).classify(RuntimeError()).kind is (
            FailureKind.permanent
        )

    def test_unknown_kind_rejected(self) -> None:
        with pytest.raises(ValueError):
            Classifier().register(KeyError, "sometimes")


class TestRetryAfterParsing:
    """Retry-After is seconds or an HTTP-date; nonsense gives None, the past gives 0."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("120", 120.0),
            (b"3", 3.0),
            (2, 2.0),
            ("-5", 0.0),
            (http_date(60), 60.0),
            (http_date(-60), 0.0),
            ("soon", None),
            (None, None),
        ],
    )
    def test_parse(self, value: object, expected: float | None) -> None:
        got = parse_retry_after(value, now=NOW)
        if expected is None:
            assert got is None
        else:
            assert got == pytest.approx(expected, abs=1.0)
