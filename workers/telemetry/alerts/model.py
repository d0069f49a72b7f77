"""Alerts and silences as plain, frozen data.

An alert is identified by its fingerprint: a stable hash of its name (the
rule), its service and its sorted labels. Two evaluations that find the same
condition produce the same fingerprint, so the second one updates the first
alert instead of creating another. Times are UTC unix seconds; `iso()` renders
them as RFC 3339 with a `Z`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

Severity = Literal["critical", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "info")
Status = Literal["firing", "resolved"]


def fingerprint(name: str, service: str, labels: Mapping[str, str]) -> str:
    """A stable 16-hex-digit hash of (name, service, sorted labels)."""
    raw = json.dumps([name, service, sorted(labels.items())], separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def iso(ts: float | None) -> str | None:
    """Unix seconds as RFC 3339 UTC (`2024-05-01T12:00:00.000Z`), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    """What a rule found: an alert before it has times and a delivery history."""

    name: str
    service: str
    severity: Severity
    message: str
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Repeat this alert after so many seconds instead of the configured repeat interval.
    repeat_interval: float | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r}: expected one of {SEVERITIES}")
        object.__setattr__(self, "labels", {str(k): str(v) for k, v in self.labels.items()})

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.name, self.service, self.labels)


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """One alert with its history: when it started, ended, was last seen and last sent."""

    id: str
    name: str
    service: str
    severity: Severity
    message: str
    labels: Mapping[str, str]
    starts_at: float
    updated_at: float
    ends_at: float | None = None
    #: When a notification about this alert last went out (None: never, e.g. silenced).
    sent_at: float | None = None
    repeat_interval: float | None = None

    @classmethod
    def start(cls, condition: Condition, now: float) -> Alert:
        return cls(
            id=condition.fingerprint,
            name=condition.name,
            service=condition.service,
            severity=condition.severity,
            message=condition.message,
            labels=dict(condition.labels),
            starts_at=now,
            updated_at=now,
            repeat_interval=condition.repeat_interval,
        )

    @property
    def fingerprint(self) -> str:
        return self.id

    @property
    def status(self) -> Status:
        return "firing" if self.ends_at is None else "resolved"

    @property
    def all_labels(self) -> dict[str, str]:
        """The labels a silence or a receiver matches on: alertname, service, severity, rest."""
        return {
            **self.labels,
            "alertname": self.name,
            "service": self.service,
            "severity": self.severity,
        }

    def seen(self, condition: Condition, now: float) -> Alert:
        return replace(self, message=condition.message, severity=condition.severity, updated_at=now)

    def resolve(self, now: float) -> Alert:
        return replace(self, ends_at=now, updated_at=now)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Alert:
        return cls(**json.loads(raw))

    def to_dict(self) -> dict[str, Any]:
        """The alert as receivers see it (times in RFC 3339 UTC)."""
        return {
            "id": self.id,
            "fingerprint": self.id,
            "status": self.status,
            "name": self.name,
            "service": self.service,
            "severity": self.severity,
            "message": self.message,
            "labels": self.all_labels,
            "starts_at": iso(self.starts_at),
            "ends_at": iso(self.ends_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Silence:
    """Mutes every alert whose labels match all `matchers`, until `ends_at`."""

    matchers: Mapping[str, str]
    starts_at: float
    ends_at: float
    comment: str = ""
    created_by: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if not self.matchers:
            raise ValueError("a silence needs at least one matcher (label=value)")
        if self.ends_at <= self.starts_at:
            raise ValueError("a silence must end after it starts")

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, alert: Alert) -> bool:
        labels = alert.all_labels
        return all(labels.get(k) == v for k, v in self.matchers.items())

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Silence:
        return cls(**json.loads(raw))
