"""One `Settings` object, read from the environment.

Every field names its environment variable and what it accepts. Values are
parsed and validated together; a bad value raises `SettingsError`, which names
each offending variable and what it accepts. Durations are float seconds.
Nothing is read at import: call `Settings.from_env()` (or `get_settings()`).

A secret setting (`secret=True`) holds a `workers.secrets.Secret` (it shows
`'********'`; `.reveal()` gives the value), read from `NAME` or from the file
named by `NAME_FILE` (a mounted Docker/Kubernetes secret, mode 0600). The
process's settings (`get_settings()`) hand every secret value to the log
redaction, which masks it wherever it appears. `BULWARK_PROFILE=production`
refuses settings that are only fit for development (`Settings.production_problems`).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from policies import endpoints
from workers.secrets import (
    Secret,
    SecretFileError,
    cert_reqs,
    hide_password,
    plaintext_remote,
    read_secret_file,
    url_password,
    with_password,
)
from workers.telemetry.redact import remember_secrets

__all__ = [
    "FILE_SUFFIX",
    "ObservabilitySettings",
    "ResilienceSettings",
    "ScalingSettings",
    "SecuritySettings",
    "Settings",
    "SettingsError",
    "get_settings",
    "secret_variables",
]


class SettingsError(ValueError):
    """One or more environment variables hold a value Bulwark cannot use."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


# --- parsers: each takes the raw string and returns a value or raises ValueError


@dataclass(frozen=True, slots=True)
class Parser:
    parse: Callable[[str], Any]
    accepts: str


def _int(minimum: int) -> Parser:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if value < minimum:
            raise ValueError
        return value

    return Parser(parse, f"a whole number >= {minimum}")


def _port(minimum: int = 1) -> Parser:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not minimum <= value <= 65535:
            raise ValueError
        return value

    return Parser(parse, f"a TCP port from {minimum} to 65535")


def _seconds(minimum: float = 0.0, *, inclusive: bool = False) -> Parser:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError
        if value < minimum or (value == minimum and not inclusive):
            raise ValueError
        return value

    op = ">=" if inclusive else ">"
    return Parser(parse, f"a number of seconds {op} {minimum:g} (e.g. 30 or 0.5)")


def _ratio() -> Parser:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if not 0.0 <= value <= 1.0:
            raise ValueError
        return value

    return Parser(parse, "a number from 0 to 1")


def _fraction(*, zero: bool, one: bool) -> Parser:
    """A number between 0 and 1, each end allowed or not."""

    def parse(raw: str) -> float:
        value = float(raw.strip())
        low = value >= 0.0 if zero else value > 0.0
        high = value <= 1.0 if one else value < 1.0
        if not (low and high):
            raise ValueError
        return value

    lo, hi = ("from 0" if zero else "above 0"), ("up to 1" if one else "below 1")
    return Parser(parse, f"a number {lo}, {hi}")


def _percent() -> Parser:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if not 0.0 < value <= 100.0:
            raise ValueError
        return value

    return Parser(parse, "a percentage above 0, up to 100")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool() -> Parser:
    def parse(raw: str) -> bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError

    return Parser(parse, "one of true/false, yes/no, on/off, 1/0")


def _choice(*options: str) -> Parser:
    def parse(raw: str) -> str:
        lowered = raw.strip().lower()
        if lowered not in options:
            raise ValueError
        return lowered

    return Parser(parse, "one of " + ", ".join(options))


_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def _names() -> Parser:
    def parse(raw: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in raw.split(",") if n.strip())
        if not names or any(not _NAME.match(n) for n in names) or len(set(names)) != len(names):
            raise ValueError
        return names

    return Parser(parse, "a comma-separated list of distinct lower-case names (a-z, 0-9, _ -)")


def _url(*schemes: str) -> Parser:
    def parse(raw: str) -> str:
        value = raw.strip()
        if not any(value.startswith(f"{s}://") for s in schemes):
            raise ValueError
        return value

    return Parser(parse, "a URL starting with " + " or ".join(f"{s}://" for s in schemes))


#: Which engines each store URL may name (`policies.endpoints`).
_POLICY_STORES = ("redis", "sentinel", "cluster")
_BROKERS = ("redis", "sentinel", "amqp")
_BACKENDS = ("redis", "sentinel")

_SCHEMES = {
    "redis": "redis://, rediss://, unix://",
    "sentinel": "sentinel://",
    "cluster": "redis+cluster://",
    "amqp": "amqp://",
}


def _master_name() -> Parser:
    def parse(raw: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", raw.strip()):
            raise ValueError
        return raw.strip()

    return Parser(parse, "a sentinel master name (1-100 of A-Z a-z 0-9 _ . -)")


def _redis_url(kinds: tuple[str, ...] = _POLICY_STORES) -> Parser:
    """A store URL (`kinds`: the engines this store may be); a TLS one must say how to
    check the server's certificate (kombu would otherwise connect without checking it,
    with only a warning). An engine this store cannot be is refused by
    `endpoints.problems` (at `Settings.from_env`), which says why."""

    def parse(raw: str) -> str:
        value = raw.strip()
        endpoint = endpoints.parse(value)  # ValueError: the setting's message says what fits
        if endpoint.scheme in ("rediss", "rediss+cluster") and not cert_reqs(value):
            raise ValueError
        return value

    return Parser(
        parse,
        f"a URL starting with {', '.join(_SCHEMES[k] for k in kinds)}; a rediss:// URL names "
        "ssl_cert_reqs=required (and ssl_ca_certs=PATH for a private CA)",
    )


def _globs() -> Parser:
    def parse(raw: str) -> tuple[str, ...]:
        globs = tuple(g.strip() for g in raw.split(",") if g.strip())
        if not globs or any(not re.fullmatch(r"[A-Za-z0-9_.*@:-]{1,200}", g) for g in globs):
            raise ValueError
        return globs

    return Parser(parse, "a comma-separated list of task-name globs (payments.*, *.charge)")


#: Bounds of a group's worker count: `MIN..MAX`, each at most three digits.
_BOUNDS = re.compile(r"(\d{1,3})\.\.(\d{1,3})")
_GROUP = re.compile(r"[a-z][a-z0-9_-]{0,63}")


@dataclass(frozen=True, slots=True)
class FleetBounds:
    """How many workers each Procfile worker group may have: `default` unless named."""

    default: tuple[int, int] = (1, 3)
    groups: tuple[tuple[str, int, int], ...] = ()

    def of(self) -> dict[str, tuple[int, int]]:
        return {name: (low, high) for name, low, high in self.groups}

    def __str__(self) -> str:
        named = [f"{name}={low}..{high}" for name, low, high in self.groups]
        return ",".join([f"{self.default[0]}..{self.default[1]}", *named])


def _fleet_bounds() -> Parser:
    def bounds(raw: str) -> tuple[int, int]:
        found = _BOUNDS.fullmatch(raw.strip())
        if found is None or not 0 <= int(found[1]) <= int(found[2]) or int(found[2]) < 1:
            raise ValueError
        return int(found[1]), int(found[2])

    def parse(raw: str) -> FleetBounds:
        default, groups, seen = (1, 3), [], set()
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if not items or len(items) > 64:
            raise ValueError
        for item in items:
            name, eq, value = item.partition("=")
            if not eq:
                default = bounds(item)
                continue
            name = name.strip()
            if not _GROUP.fullmatch(name) or name in seen:
                raise ValueError
            seen.add(name)
            groups.append((name, *bounds(value)))
        return FleetBounds(default, tuple(groups))

    return Parser(
        parse,
        "MIN..MAX workers for every group, then GROUP=MIN..MAX for named Procfile entries, "
        "comma-separated (e.g. 1..3,worker_payments=1..1); 0 <= MIN <= MAX, MAX >= 1",
    )


def _text() -> Parser:
    def parse(raw: str) -> str:
        if not raw.strip():
            raise ValueError
        return raw.strip()

    return Parser(parse, "a non-empty string")


def setting(env: str, parser: Parser, default: Any, doc: str, *, secret: bool = False) -> Any:
    """Declare a settings field bound to environment variable `env`.

    A secret one (`secret=True`) holds a `Secret`, and is also read from the file that
    `<env>_FILE` names; its value is never shown (errors say `<secret>`).
    """
    meta = {"env": env, "parser": parser, "doc": doc, "secret": secret}
    return field(default=default, metadata=meta)


#: What a secret setting's variable name gets to name the file holding it instead.
FILE_SUFFIX = "_FILE"


# --- groups


@dataclass(frozen=True, slots=True, kw_only=True)
class ResilienceSettings:
    """Circuit breakers, retries, bulkheads, degradation."""

    breaker_failure_threshold: int = setting(
        "BULWARK_BREAKER_FAILURE_THRESHOLD", _int(1), 5, "consecutive failures that open a breaker"
    )
    breaker_timeout: float = setting(
        "BULWARK_BREAKER_TIMEOUT", _seconds(), 30.0, "seconds a breaker stays open"
    )
    breaker_success_threshold: int = setting(
        "BULWARK_BREAKER_SUCCESS_THRESHOLD",
        _int(1),
        3,
        "half-open trial calls that must succeed to close",
    )
    retry_max_attempts: int = setting(
        "BULWARK_RETRY_MAX_ATTEMPTS", _int(1), 3, "attempts per task, the first included"
    )
    retry_base_delay: float = setting(
        "BULWARK_RETRY_BASE_DELAY", _seconds(), 0.1, "first retry delay, seconds"
    )
    retry_max_delay: float = setting(
        "BULWARK_RETRY_MAX_DELAY", _seconds(), 30.0, "cap on any retry delay, seconds"
    )
    bulkhead_max_concurrent: int = setting(
        "BULWARK_BULKHEAD_MAX_CONCURRENT", _int(1), 10, "fleet-wide concurrent calls per bulkhead"
    )
    degradation_enabled: bool = setting(
        "BULWARK_DEGRADATION_ENABLED", _bool(), True, "automatic degradation on"
    )
    degradation_recovery_step: float = setting(
        "BULWARK_DEGRADATION_RECOVERY_STEP",
        _seconds(0.0, inclusive=True),
        30.0,
        "seconds of health before a degraded service recovers one level",
    )
    retry_budget_ratio: float = setting(
        "BULWARK_RETRY_BUDGET_RATIO", _ratio(), 0.2, "retries allowed per call, fleet-wide"
    )
    retry_budget_window: float = setting(
        "BULWARK_RETRY_BUDGET_WINDOW", _seconds(), 60.0, "sliding window of the retry budget"
    )
    retry_budget_min: int = setting(
        "BULWARK_RETRY_BUDGET_MIN", _int(0), 10, "retries always allowed per window"
    )
    defer_max: int = setting(
        "BULWARK_DEFER_MAX",
        _int(0),
        50,
        "deferrals (open breaker, full bulkhead) before a task is dead-lettered",
    )
    defer_max_delay: float = setting(
        "BULWARK_DEFER_MAX_DELAY", _seconds(), 60.0, "cap on one deferral's countdown, seconds"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ObservabilitySettings:
    """Metrics, traces, logs and health checks."""

    alert_evaluate_interval: float = setting(
        "BULWARK_ALERT_EVALUATE_INTERVAL",
        _seconds(),
        10.0,
        "seconds between alert rule evaluations",
    )
    alert_group_wait: float = setting(
        "BULWARK_ALERT_GROUP_WAIT",
        _seconds(0.0, inclusive=True),
        5.0,
        "seconds a new alert group waits for more alerts before its first notification",
    )
    alert_group_by: tuple[str, ...] = setting(
        "BULWARK_ALERT_GROUP_BY",
        _names(),
        ("service",),
        "labels that group alerts into one notification",
    )
    alert_repeat_interval: float = setting(
        "BULWARK_ALERT_REPEAT_INTERVAL",
        _seconds(),
        3600.0,
        "seconds before an unchanged firing alert is sent again",
    )
    alert_watchdog_interval: float = setting(
        "BULWARK_ALERT_WATCHDOG_INTERVAL",
        _seconds(),
        300.0,
        "seconds between Watchdog (dead-man's switch) notifications",
    )
    alert_backlog_threshold: int = setting(
        "BULWARK_ALERT_BACKLOG_THRESHOLD",
        _int(1),
        1000,
        "messages waiting in one queue above which a backlog alert fires",
    )
    alert_deadletter_window: float = setting(
        "BULWARK_ALERT_DEADLETTER_WINDOW",
        _seconds(),
        300.0,
        "seconds a dead-letter growth alert keeps firing after the last new dead letter",
    )
    alert_security_refusals: int = setting(
        "BULWARK_ALERT_SECURITY_REFUSALS",
        _int(0),
        10,
        "task messages refused by verification within a minute, fleet-wide, above which "
        "a security alert fires",
    )
    alert_log: bool = setting("BULWARK_ALERT_LOG", _bool(), True, "log every alert notification")
    alert_webhook_url: str | None = setting(
        "BULWARK_ALERT_WEBHOOK_URL",
        _url("http", "https"),
        None,
        "generic webhook for alerts (JSON, HMAC-SHA256 signed with BULWARK_ALERT_WEBHOOK_SECRET)",
    )
    alert_slack_url: str | None = setting(
        "BULWARK_ALERT_SLACK_URL",
        _url("http", "https"),
        None,
        "Slack-compatible webhook for alerts",
    )
    alertmanager_url: str | None = setting(
        "BULWARK_ALERTMANAGER_URL",
        _url("http", "https"),
        None,
        "Prometheus Alertmanager base URL (alerts POSTed to /api/v2/alerts)",
    )
    alert_smtp_host: str | None = setting(
        "BULWARK_ALERT_SMTP_HOST", _text(), None, "SMTP server for alert email (unset: no email)"
    )
    alert_smtp_port: int = setting("BULWARK_ALERT_SMTP_PORT", _port(), 25, "SMTP port")
    alert_smtp_starttls: bool = setting(
        "BULWARK_ALERT_SMTP_STARTTLS", _bool(), False, "upgrade the SMTP connection with STARTTLS"
    )
    alert_smtp_user: str | None = setting(
        "BULWARK_ALERT_SMTP_USER",
        _text(),
        None,
        "SMTP login user (password: BULWARK_ALERT_SMTP_PASSWORD)",
    )
    alert_email_from: str = setting(
        "BULWARK_ALERT_EMAIL_FROM", _text(), "bulwark@localhost", "sender of alert email"
    )
    alert_email_to: str | None = setting(
        "BULWARK_ALERT_EMAIL_TO", _text(), None, "comma-separated recipients of alert email"
    )
    alert_sink_timeout: float = setting(
        "BULWARK_ALERT_SINK_TIMEOUT", _seconds(), 5.0, "seconds one alert sink call may take"
    )

    health_check_interval: float = setting(
        "BULWARK_HEALTH_CHECK_INTERVAL", _seconds(), 30.0, "seconds between fleet health checks"
    )
    metrics_interval: float = setting(
        "BULWARK_METRICS_INTERVAL", _seconds(), 15.0, "seconds between fleet metric refreshes"
    )
    log_level: str = setting(
        "BULWARK_LOG_LEVEL",
        _choice("debug", "info", "warning", "error", "critical"),
        "info",
        "lowest level logged",
    )
    log_json: bool = setting("BULWARK_LOG_JSON", _bool(), True, "one JSON object per log line")
    heartbeat_ttl: float = setting(
        "BULWARK_HEARTBEAT_TTL", _seconds(), 30.0, "seconds a worker heartbeat key lives"
    )
    http_host: str = setting(
        "BULWARK_HTTP_HOST",
        _text(),
        "127.0.0.1",
        "address each worker's /metrics, /healthz, /readyz server binds to",
    )
    http_port: int = setting(
        "BULWARK_HTTP_PORT",
        _port(0),
        0,
        "port of that server (0: a free port, advertised in Redis; the Procfile sets one each)",
    )
    metrics_dir: str | None = setting(
        "BULWARK_METRICS_DIR",
        _text(),
        None,
        "folder for multiprocess metric files, one subfolder per worker (default: the temp dir)",
    )
    liveness_stale: float = setting(
        "BULWARK_LIVENESS_STALE",
        _seconds(),
        60.0,
        "seconds without an event-loop turn (broker connected) before /healthz fails",
    )
    health_backlog_threshold: int = setting(
        "BULWARK_HEALTH_BACKLOG_THRESHOLD",
        _int(1),
        1000,
        "ready messages in one queue above which the backlog check reports degraded",
    )
    task_events: str = setting(
        "BULWARK_TASK_EVENTS",
        _choice("on-demand", "always"),
        "on-demand",
        "Celery task events (Flower's live view): on-demand sends them only while a monitor "
        "asks for them (Flower does every 5 s; off 30 s after the last ask), always sends "
        "them from the start, task-sent events of producers included",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SecuritySettings:
    """Message authentication, encryption, audit and the operator UI."""

    profile: str = setting(
        "BULWARK_PROFILE",
        _choice("development", "production"),
        "development",
        "production refuses to start with BULWARK_SECURITY=off, plaintext redis:// off this "
        "host, a rediss:// URL without ssl_cert_reqs=required, Flower without a password, or "
        "no BULWARK_AUDIT_KEY_FILE",
    )
    enabled: bool = setting(
        "BULWARK_SECURITY",
        _bool(),
        True,
        "sign every task message and verify it before it runs (off: a warning at start)",
    )
    trust_file: str | None = setting(
        "BULWARK_TRUST_FILE",
        _text(),
        None,
        "the trust store (TOML: identities, public keys, what each may send); "
        "re-read within 2 s of a change",
    )
    trust_root_key_file: str | None = setting(
        "BULWARK_TRUST_ROOT_KEY_FILE",
        _text(),
        None,
        "the admin root public key: read the trust store published in Redis "
        "(`bulwark keys publish`), signed by it, instead of BULWARK_TRUST_FILE",
    )
    identity: str | None = setting(
        "BULWARK_IDENTITY", _text(), None, "this process's identity in the trust store"
    )
    signing_key_file: str | None = setting(
        "BULWARK_SIGNING_KEY_FILE",
        _text(),
        None,
        "this process's Ed25519 private key (PEM; refused if group or others may read it)",
    )
    message_ttl: float = setting(
        "BULWARK_MESSAGE_TTL",
        _seconds(1.0),
        3600.0,
        "seconds a signed message stays valid after it is sent (or after its ETA)",
    )
    keys_dir: str | None = setting(
        "BULWARK_KEYS_DIR",
        _text(),
        None,
        "folder of the keys `bulwark up` and `bulwark keys` keep (default: .bulwark/keys)",
    )
    audit_key_file: str | None = setting(
        "BULWARK_AUDIT_KEY_FILE",
        _text(),
        None,
        "Ed25519 private key that signs audit checkpoints (no audit log if unset)",
    )
    audit_public_key_file: str | None = setting(
        "BULWARK_AUDIT_PUBLIC_KEY_FILE",
        _text(),
        None,
        "the audit public key, for `bulwark audit verify`",
    )
    audit_dir: str | None = setting(
        "BULWARK_AUDIT_DIR",
        _text(),
        None,
        "folder of the audit log's JSON-lines files (one per process); Redis stream only if unset",
    )
    clock_skew: float = setting(
        "BULWARK_CLOCK_SKEW",
        _seconds(0.0),
        30.0,
        "seconds a message may be issued ahead of the worker's clock",
    )
    encrypt: tuple[str, ...] = setting(
        "BULWARK_ENCRYPT",
        _globs(),
        (),
        "task-name globs whose arguments and results are encrypted (AES-256-GCM), e.g. payments.*",
    )
    data_keys_file: str | None = setting(
        "BULWARK_DATA_KEYS_FILE",
        _text(),
        None,
        "the data key ring of encrypted tasks (JSON, mode 0600; `bulwark keys data-rotate`)",
    )

    flower_user: str = setting("BULWARK_FLOWER_USER", _text(), "admin", "Flower basic-auth user")
    flower_password: Secret | None = setting(  # noqa: RUF009 (a field, as every setting)
        "BULWARK_FLOWER_PASSWORD",
        _text(),
        None,
        "Flower basic-auth password (generated and printed by `bulwark up` if unset)",
        secret=True,
    )
    flower_port: int = setting("BULWARK_FLOWER_PORT", _port(), 5555, "Flower port on 127.0.0.1")
    alert_webhook_secret: Secret | None = setting(  # noqa: RUF009 (a field, as every setting)
        "BULWARK_ALERT_WEBHOOK_SECRET",
        _text(),
        None,
        "shared secret of the alert webhook's HMAC-SHA256 signature",
        secret=True,
    )
    alert_smtp_password: Secret | None = setting(  # noqa: RUF009 (a field, as every setting)
        "BULWARK_ALERT_SMTP_PASSWORD", _text(), None, "SMTP login password", secret=True
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalingSettings:
    """Worker pools and their bulkhead queues."""

    queues: tuple[str, ...] = setting(
        "BULWARK_QUEUES",
        _names(),
        ("payments", "inventory", "notifications"),
        "bulkhead queues; a task named `<queue>.<job>` is routed to `<queue>`",
    )
    worker_concurrency: int = setting(
        "BULWARK_WORKER_CONCURRENCY", _int(1), 2, "prefork processes per worker"
    )
    prefetch_multiplier: int = setting(
        "BULWARK_PREFETCH_MULTIPLIER",
        _int(1),
        1,
        "messages each worker process reserves ahead (acks late: a reserved message is never "
        "lost, but waits for the visibility timeout if its worker is killed); 4 for short jobs",
    )
    task_time_limit: float = setting(
        "BULWARK_TASK_TIME_LIMIT", _seconds(), 300.0, "hard time limit per task, seconds"
    )
    autoscale_interval: float = setting(
        "BULWARK_AUTOSCALE_INTERVAL",
        _seconds(0.5, inclusive=True),
        5.0,
        "seconds between pool-size decisions of a worker run with --autoscale=MAX,MIN",
    )
    autoscale_utilization: float = setting(
        "BULWARK_AUTOSCALE_UTILIZATION",
        _fraction(zero=False, one=True),
        0.75,
        "share of pool processes meant to be busy at steady load (autoscale)",
    )
    autoscale_tolerance: float = setting(
        "BULWARK_AUTOSCALE_TOLERANCE",
        _fraction(zero=True, one=False),
        0.1,
        "relative change of the load below which the pool size stays (autoscale)",
    )
    autoscale_max_step: int = setting(
        "BULWARK_AUTOSCALE_MAX_STEP", _int(1), 4, "most processes added by one decision"
    )
    autoscale_drain_seconds: float = setting(
        "BULWARK_AUTOSCALE_DRAIN_SECONDS",
        _seconds(),
        30.0,
        "seconds the pool should take to drain a backlog, on top of keeping up (autoscale)",
    )
    autoscale_scale_down_window: float = setting(
        "BULWARK_AUTOSCALE_SCALE_DOWN_WINDOW",
        _seconds(),
        60.0,
        "seconds of decisions a shrink looks back over; it keeps their largest size",
    )
    autoscale_max_cpu: float = setting(
        "BULWARK_AUTOSCALE_MAX_CPU", _percent(), 90.0, "host CPU percent above which no growth"
    )
    autoscale_max_memory: float = setting(
        "BULWARK_AUTOSCALE_MAX_MEMORY",
        _percent(),
        90.0,
        "host memory percent above which no growth",
    )
    balance_refresh: float = setting(
        "BULWARK_BALANCE_REFRESH",
        _seconds(0.05, inclusive=True),
        1.0,
        "seconds between the snapshots of target queues that balanced tasks are routed by "
        "(backlog, breaker, bulkhead); never a Redis call per message",
    )
    fleet_workers: FleetBounds = setting(  # noqa: RUF009 (a field, as every setting)
        "BULWARK_FLEET_WORKERS",
        _fleet_bounds(),
        FleetBounds(),
        "workers each Procfile worker group may have, for beat's fleet scaler (KEDA, "
        "`bulwark up`): MIN..MAX for all, GROUP=MIN..MAX for one",
    )
    fleet_scale_interval: float = setting(
        "BULWARK_FLEET_SCALE_INTERVAL",
        _seconds(1.0, inclusive=True),
        15.0,
        "seconds between the leading beat's fleet scaling decisions",
    )
    procfile: str = setting(
        "BULWARK_PROCFILE",
        _text(),
        "Procfile",
        "the Procfile whose worker entries beat's fleet scaler sizes (relative: to the "
        "working directory)",
    )
    beat_lock_ttl: float = setting(
        "BULWARK_BEAT_LOCK_TTL",
        _seconds(1.0, inclusive=True),
        10.0,
        "seconds the leading beat holds its lock unrenewed: a standby beat takes over "
        "within this after the leader dies",
    )
    amqp_queue_type: str = setting(
        "BULWARK_AMQP_QUEUE_TYPE",
        _choice("quorum", "classic"),
        "quorum",
        "RabbitMQ broker only: quorum queues (replicated; countdowns by native delayed "
        "delivery; no priorities before RabbitMQ 4) or classic (priorities 0-9)",
    )
    amqp_delivery_limit: int = setting(
        "BULWARK_AMQP_DELIVERY_LIMIT",
        _int(1),
        10,
        "RabbitMQ quorum queues: deliveries of one message (each crash of the process "
        "running it) before RabbitMQ dead-letters it to bulwark.dead",
    )
    visibility_timeout: float = setting(
        "BULWARK_VISIBILITY_TIMEOUT",
        _seconds(),
        3600.0,
        "seconds before a task held by a worker that died is delivered again (within a few "
        "seconds more); must exceed every countdown plus the task time limit",
    )


# Fixed queue names; bulkhead queues come on top of these.
DEFAULT_QUEUE = "default"
ALERTS_QUEUE = "alerts"
DEADLETTER_QUEUE = "deadletter"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything Bulwark reads from the environment."""

    redis_url: str = setting(
        "REDIS_URL",
        _redis_url(),
        "redis://127.0.0.1:6379/0",
        "Redis for policies (and the broker/backend unless set apart)",
    )
    broker_url: str | None = setting(
        "CELERY_BROKER_URL", _redis_url(_BROKERS), None, "broker; defaults to REDIS_URL"
    )
    result_backend: str | None = setting(
        "CELERY_RESULT_BACKEND",
        _redis_url(_BACKENDS),
        None,
        "result backend; defaults to REDIS_URL",
    )
    sentinel_master: str = setting(
        "BULWARK_SENTINEL_MASTER",
        _master_name(),
        "mymaster",
        "the master's name in the sentinels, for every sentinel:// URL",
    )
    redis_password: Secret | None = setting(  # noqa: RUF009 (a field, as every setting)
        "BULWARK_REDIS_PASSWORD",
        _text(),
        None,
        "Redis password, put into REDIS_URL, CELERY_BROKER_URL and CELERY_RESULT_BACKEND "
        "(each that names none)",
        secret=True,
    )
    resilience: ResilienceSettings = field(default_factory=ResilienceSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raise `SettingsError` naming each bad one."""
        env = os.environ if environ is None else environ
        problems: list[str] = []
        top = _read(cls, env, problems)
        groups = {
            f.name: f.type_class(**_read(f.type_class, env, problems)) for f in _group_fields()
        }
        if problems:
            raise SettingsError(problems)
        password = top.get("redis_password")
        if password is not None:
            top["redis_url"] = top.get("redis_url", _default_of(cls, "redis_url"))
            for name in _URL_FIELDS:
                if top.get(name) is not None:
                    top[name] = with_password(top[name], password.reveal())
        settings = cls(**top, **groups)
        settings._check_consistency()
        problems = settings.production_problems()
        if problems:
            raise SettingsError(problems)
        return settings

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _URL_FIELDS and value is not None:
                value = hide_password(value)
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def production(self) -> bool:
        return self.security.profile == "production"

    def secret_values(self) -> frozenset[str]:
        """Every secret these settings hold (revealed): the secret settings' values and the
        passwords in the Redis URLs. Handed to the log redaction by `get_settings()`."""
        values = {
            value.reveal()
            for group in (self, self.resilience, self.observability, self.security, self.scaling)
            for f in fields(group)
            if f.metadata.get("secret") and isinstance(value := getattr(group, f.name), Secret)
        }
        for url in (self.redis_url, self.broker_url, self.result_backend):
            password = url_password(url) if url is not None else None
            if password is not None:
                values.add(password)
        return frozenset(values)

    def production_problems(self) -> list[str]:
        """What `BULWARK_PROFILE=production` refuses in these settings (empty: nothing, or
        the development profile)."""
        if not self.production:
            return []
        sec = self.security
        problems = []
        why = "BULWARK_PROFILE=production"
        if not sec.enabled:
            problems.append(
                f"{why} refuses BULWARK_SECURITY=off: task messages would be neither signed "
                "nor verified"
            )
        urls = {"REDIS_URL": self.redis_url}
        if self.broker_url is not None:
            urls["CELERY_BROKER_URL"] = self.broker_url
        if self.result_backend is not None:
            urls["CELERY_RESULT_BACKEND"] = self.result_backend
        for name, url in urls.items():
            if plaintext_remote(url):
                problems.append(
                    f"{why} refuses {name}={hide_password(url)}: plain redis:// to a host "
                    "that is not this one's loopback; use rediss:// (TLS, "
                    "ssl_cert_reqs=required) or a unix:// socket"
                )
            elif url.startswith("rediss://") and cert_reqs(url) not in _REQUIRED:
                problems.append(
                    f"{why} refuses {name}={hide_password(url)}: ssl_cert_reqs="
                    f"{cert_reqs(url)} does not check the server's certificate; use "
                    "ssl_cert_reqs=required"
                )
        if sec.flower_password is None:
            problems.append(
                f"{why} needs BULWARK_FLOWER_PASSWORD (or BULWARK_FLOWER_PASSWORD_FILE): "
                "Flower never runs without basic auth, and production generates no password"
            )
        if sec.audit_key_file is None:
            problems.append(
                f"{why} needs BULWARK_AUDIT_KEY_FILE: the audit log's checkpoints are signed "
                "with it (`bulwark keys init` makes one)"
            )
        return problems

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def rabbitmq(self) -> bool:
        """Whether the broker is RabbitMQ (every other store is then still Redis)."""
        return endpoints.parse(self.broker).kind == "amqp"

    @property
    def delays_in_broker(self) -> bool:
        """Whether countdowns wait in RabbitMQ's delay exchanges (Celery's native delayed
        delivery, on quorum queues), in whole seconds."""
        return self.rabbitmq and self.scaling.amqp_queue_type == "quorum"

    @property
    def all_queues(self) -> tuple[str, ...]:
        """Every queue the fleet knows, bulkhead queues first."""
        fixed = (DEFAULT_QUEUE, ALERTS_QUEUE, DEADLETTER_QUEUE)
        return self.scaling.queues + tuple(q for q in fixed if q not in self.scaling.queues)

    @property
    def longest_countdown(self) -> float:
        """The longest countdown Bulwark ever schedules (retry, deferral)."""
        r = self.resilience
        return max(r.retry_max_delay, r.defer_max_delay, r.breaker_timeout)

    @property
    def keys_folder(self) -> Path:
        """Where `bulwark up` and `bulwark keys` keep keys."""
        return Path(self.security.keys_dir or ".bulwark/keys")

    @property
    def countdown_horizon(self) -> float:
        """The longest countdown (or ETA from now) a task may carry: a longer one would
        outlast the visibility timeout while the worker holds it, and be delivered twice."""
        return self.scaling.visibility_timeout - self.scaling.task_time_limit

    @property
    def restore_interval(self) -> float:
        """Seconds between the broker's sweeps for tasks whose worker died."""
        return min(5.0, max(0.5, self.scaling.visibility_timeout / 10))

    def _check_consistency(self) -> None:
        stores = endpoints.problems(self.redis_url, self.broker, self.backend)
        if stores:
            raise SettingsError(stores)
        needed = self.longest_countdown + self.scaling.task_time_limit
        if self.scaling.visibility_timeout <= needed:
            raise SettingsError(
                [
                    f"BULWARK_VISIBILITY_TIMEOUT={self.scaling.visibility_timeout:g} must exceed "
                    f"the longest countdown plus BULWARK_TASK_TIME_LIMIT ({needed:g} s), or Redis "
                    "redelivers tasks that are still waiting or running"
                ]
            )
        if self.observability.alert_webhook_url and not self.security.alert_webhook_secret:
            raise SettingsError(
                ["BULWARK_ALERT_WEBHOOK_URL needs BULWARK_ALERT_WEBHOOK_SECRET (the HMAC key)"]
            )
        if self.security.encrypt and not self.security.enabled:
            raise SettingsError(
                [
                    "BULWARK_ENCRYPT needs BULWARK_SECURITY on: workers open sealed arguments "
                    "only after verifying the message's signature"
                ]
            )
        clash = {DEFAULT_QUEUE, ALERTS_QUEUE, DEADLETTER_QUEUE} & set(self.scaling.queues)
        if clash:
            raise SettingsError([f"BULWARK_QUEUES may not name the fixed queues {sorted(clash)}"])


#: The Redis URLs (a password given by BULWARK_REDIS_PASSWORD goes into each).
_URL_FIELDS = ("redis_url", "broker_url", "result_backend")
#: `ssl_cert_reqs` values that make the client check the server's certificate.
_REQUIRED = frozenset({"required", "cert_required"})


def _default_of(cls: type, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


@dataclass(frozen=True, slots=True)
class _Group:
    name: str
    type_class: type


def _group_fields() -> list[_Group]:
    return [
        _Group("resilience", ResilienceSettings),
        _Group("observability", ObservabilitySettings),
        _Group("security", SecuritySettings),
        _Group("scaling", ScalingSettings),
    ]


def _read(cls: type, env: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    """The values of `cls`'s fields that `env` sets; what is wrong goes to `problems`.

    Messages name variables and files, never a secret's value, and are worded so that
    the log redaction (which masks what follows `<secret-like name>:`) leaves them whole.
    """
    values: dict[str, Any] = {}
    for f in fields(cls):
        if "env" not in f.metadata:
            continue
        name, parser, secret = f.metadata["env"], f.metadata["parser"], f.metadata["secret"]
        raw = env.get(name) or None
        path = (env.get(name + FILE_SUFFIX) or None) if secret else None
        if path is not None:
            if raw is not None:
                problems.append(f"{name} and {name}{FILE_SUFFIX} are both set: set one of them")
                continue
            try:
                raw = read_secret_file(path)
            except SecretFileError as exc:
                problems.append(f"{name}{FILE_SUFFIX} refused, {exc}")
                continue
        if raw is None:
            continue
        try:
            value = parser.parse(raw)
        except ValueError as exc:
            if path is not None:
                problems.append(f"{name}{FILE_SUFFIX} ({path}) does not hold {parser.accepts}")
            else:
                shown = "<secret>" if secret else _shown(raw)
                why = f" ({exc})" if isinstance(exc, endpoints.BadEndpoint) else ""
                problems.append(f"{name}={shown}: expected {parser.accepts}{why}")
            continue
        values[f.name] = Secret(value) if secret else value
    return values


def _shown(raw: str) -> str:
    """A bad value as the error shows it: quoted, and clipped if long."""
    return repr(raw) if len(raw) <= 80 else repr(raw[:77]) + f"... ({len(raw)} characters)"


#: BULWARK_* variables read outside `Settings` (the demo, the supervisor's state folder).
OTHER_VARIABLES = frozenset(
    {"BULWARK_DEMO_RATE", "BULWARK_DEMO_HEALTHY", "BULWARK_DEMO_OUTAGE", "BULWARK_STATE_DIR"}
)


def secret_variables() -> frozenset[str]:
    """The variables of the secret settings (each also read from `<name>_FILE`)."""
    return frozenset(
        f.metadata["env"]
        for cls in [Settings] + [g.type_class for g in _group_fields()]
        for f in fields(cls)
        if f.metadata.get("secret")
    )


def known_variables() -> frozenset[str]:
    """Every BULWARK_* variable Bulwark reads (the `_FILE` names of secrets too)."""
    files = {name + FILE_SUFFIX for name in secret_variables()}
    return frozenset(env for _group, env, *_ in describe()) | files | OTHER_VARIABLES


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each BULWARK_* variable Bulwark does not read, naming the closest one."""
    known = known_variables()
    warnings = []
    for name in sorted(n for n in environ if n.startswith("BULWARK_") and n not in known):
        tails = {k.removeprefix("BULWARK_"): k for k in known}
        close = difflib.get_close_matches(name.removeprefix("BULWARK_"), sorted(tails), 1, 0.7)
        hint = f"; did you mean {tails[close[0]]}?" if close else ""
        warnings.append(f"{_shown(name)[1:-1]} is not a Bulwark setting and is ignored{hint}")
    return warnings


def describe() -> Iterator[tuple[str, str, str, str, str]]:
    """Yield (group, variable, default, accepts, meaning) for every setting."""
    for group_name, cls in [("connections", Settings)] + [
        (g.name, g.type_class) for g in _group_fields()
    ]:
        for f in fields(cls):
            if "env" not in f.metadata:
                continue
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(default)
            shown = "(unset)" if default is None else str(default)
            if isinstance(f.default, bool):
                shown = str(f.default).lower()
            doc = f.metadata["doc"]
            if f.metadata["secret"]:
                doc += (
                    f"; secret: or {f.metadata['env']}{FILE_SUFFIX}, a file holding it "
                    "(mode 0600), never shown"
                )
            yield (group_name, f.metadata["env"], shown, f.metadata["parser"].accepts, doc)


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment on first use.

    A BULWARK_* variable that Bulwark does not read is logged as a warning then,
    naming the closest known one (a typo would otherwise be ignored in silence).
    Every secret the settings hold is handed to the log redaction, which masks it
    wherever it appears (`workers.telemetry.redact.remember_secrets`).
    """
    settings = Settings.from_env()
    remember_secrets("settings", settings.secret_values())
    for warning in unknown_variables(os.environ):
        logging.getLogger("workers.settings").warning(warning)
    return settings
