"""What to send, given what is stored, what fires now, the silences and the time.

`plan()` is pure: the store reads the state, calls it, and writes the result
back in one transaction. The rules it applies:

- dedup: a condition with a known fingerprint updates that alert;
- group wait: a group's first notification waits `group_wait` seconds after
  its first alert started, so alerts that arrive together go out together;
- repeat: an unchanged firing alert is sent again only after its repeat
  interval; a severity change sends it at once;
- resolved: a stored alert whose condition is gone is sent once as resolved
  (if it was ever sent) and forgotten;
- silences: a matching active silence keeps an alert from every notification.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from policies.errors import PolicyConfigError
from workers.telemetry.alerts.model import SEVERITIES, Alert, Condition, Silence, Status

_RANK = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertConfig:
    """How alerts are grouped and repeated."""

    group_by: tuple[str, ...] = ("service",)
    group_wait: float = 5.0
    repeat_interval: float = 3600.0

    def __post_init__(self) -> None:
        if self.group_wait < 0:
            raise PolicyConfigError("group_wait: expected seconds >= 0")
        if self.repeat_interval <= 0:
            raise PolicyConfigError("repeat_interval: expected seconds > 0")
        if not self.group_by:
            raise PolicyConfigError("group_by: expected at least one label name")


@dataclass(frozen=True, slots=True)
class Notification:
    """The alerts of one group that are due now."""

    group: Mapping[str, str]
    alerts: tuple[Alert, ...]

    @property
    def status(self) -> Status:
        return "firing" if any(a.status == "firing" for a in self.alerts) else "resolved"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": "1",
            "receiver": "bulwark",
            "status": self.status,
            "group": dict(self.group),
            "alerts": [a.to_dict() for a in self.alerts],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The next stored state, and what goes out."""

    now: float
    #: Every alert firing after this evaluation, keyed by fingerprint.
    alerts: Mapping[str, Alert]
    #: Fingerprints to forget (resolved this evaluation).
    removed: frozenset[str]
    #: Alerts resolved this evaluation.
    resolved: tuple[Alert, ...]
    notifications: tuple[Notification, ...]
    #: Firing and resolved alerts that no silence mutes (for sinks fed on every evaluation).
    unsilenced: tuple[Alert, ...] = field(default=())
    #: Seconds until a waiting group is due (None: nothing waits).
    next_due: float | None = None


def group_of(alert: Alert, group_by: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    labels = alert.all_labels
    return tuple((name, labels.get(name, "")) for name in group_by)


def plan(
    stored: Mapping[str, Alert],
    conditions: Iterable[Condition],
    silences: Iterable[Silence],
    now: float,
    config: AlertConfig,
) -> Plan:
    current = {c.fingerprint: c for c in conditions}
    active = [s for s in silences if s.active(now)]

    def silenced(alert: Alert) -> bool:
        return any(s.matches(alert) for s in active)

    alerts: dict[str, Alert] = {}
    for fp, condition in current.items():
        old = stored.get(fp)
        if old is None:
            alerts[fp] = Alert.start(condition, now)
        else:
            alert = old.seen(condition, now)
            if alert.severity != old.severity:
                alert = replace(alert, sent_at=None)
            alerts[fp] = alert
    resolved = tuple(a.resolve(now) for fp, a in stored.items() if fp not in current)

    group_start: dict[tuple[tuple[str, str], ...], float] = {}
    for alert in alerts.values():
        key = group_of(alert, config.group_by)
        group_start[key] = min(group_start.get(key, alert.starts_at), alert.starts_at)

    due: list[Alert] = []
    next_due: float | None = None
    for fp, alert in alerts.items():
        if silenced(alert):
            continue
        if alert.sent_at is None:
            ready_at = group_start[group_of(alert, config.group_by)] + config.group_wait
        else:
            ready_at = alert.sent_at + (alert.repeat_interval or config.repeat_interval)
        if now >= ready_at:
            alerts[fp] = replace(alert, sent_at=now)
            due.append(alerts[fp])
        else:
            wait = ready_at - now
            next_due = wait if next_due is None else min(next_due, wait)
    due += [a for a in resolved if a.sent_at is not None and not silenced(a)]

    groups: dict[tuple[tuple[str, str], ...], list[Alert]] = {}
    for alert in due:
        groups.setdefault(group_of(alert, config.group_by), []).append(alert)
    notifications = tuple(
        Notification(dict(key), tuple(sorted(members, key=_order)))
        for key, members in sorted(groups.items())
    )
    unsilenced = tuple(a for a in [*alerts.values(), *resolved] if not silenced(a))
    return Plan(
        now=now,
        alerts=alerts,
        removed=frozenset(a.id for a in resolved),
        resolved=resolved,
        notifications=notifications,
        unsilenced=unsilenced,
        next_due=next_due,
    )


def _order(alert: Alert) -> tuple[int, str, str]:
    return (_RANK[alert.severity], alert.name, alert.id)
