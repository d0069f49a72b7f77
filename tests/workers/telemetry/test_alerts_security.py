"""Security refusals: classified by kind, counted fleet-wide in Redis buckets, read in the
fleet snapshot's first round trip, shown as fleet gauges, and alerted on as a burst."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
from prometheus_client import CollectorRegistry

from policies.signing import parse_claims
from tests.workers.test_fleet import QUEUES, Counting, populate
from workers.fleet import FleetSnapshot, read_fleet
from workers.security import refusals
from workers.security.refusals import BUCKET, KEPT, KINDS, REFUSALS_KEY, RefusalCount, classify
from workers.settings import get_settings
from workers.telemetry import metrics as m
from workers.telemetry.alerts.dispatch import default_rules
from workers.telemetry.alerts.rules import (
    SECURITY_REFUSAL_THRESHOLD,
    Observation,
    SecurityRefusals,
    run_rules,
)
from workers.telemetry.fleet_metrics import fleet_families

NOW = 10_000.0  # a bucket boundary: buckets start at 9990, 9980, ...


def fleet(*counts: tuple[str, float, int], now: float = NOW) -> FleetSnapshot:
    """A snapshot taken at `now` holding (kind, seconds ago the bucket started, count) rows."""
    rows = tuple(RefusalCount(kind=k, start=now - ago, count=n) for k, ago, n in counts)
    return FleetSnapshot(taken_at=now, security_refusals=rows)


def refused(metrics: m.TaskMetrics, kind: str) -> float:
    return metrics.registry.get_sample_value("bulwark_security_refusals_total", {"kind": kind}) or 0


def observe(*counts: tuple[str, float, int], now: float = NOW) -> Observation:
    return Observation(fleet=fleet(*counts, now=now))


class TestClassify:
    """Each of the verifier's refusal reasons has its kind; the unknown ones are `other`."""

    @pytest.mark.parametrize(
        ("reason", "kind"),
        [
            ("security: message is not signed (no bulwark_sig header)", "unsigned"),
            ("security: bad signature (producer 'worker', key k1)", "signature"),
            ("security: cannot verify: bad header", "signature"),
            ("security: headers cannot be verified: TypeError", "signature"),
            ("security: replayed message (jti 0123 already ran)", "replay"),
            ("security: unknown producer 'mallory'", "unauthorized"),
            ("security: producer 'narrow' not allowed to send 'bulwark.ping'", "unauthorized"),
            ("security: producer 'narrow' not allowed to send to queue 'payments'", "unauthorized"),
            ("security: producer 'narrow' no grant: denied by default", "unauthorized"),
            ("security: producer 'n' payload of 900 bytes is over its limit of 20", "unauthorized"),
            ("security: unknown key 'k9' for producer 'worker'", "credentials"),
            ("security: key k1 is revoked", "credentials"),
            ("security: key k1 expired at 2024-01-01T00:00:00+00:00", "credentials"),
            ("security: key k1 is not valid before 2030-01-01T00:00:00+00:00", "credentials"),
            ("security: expired 300 s ago", "credentials"),
            ("security: issued 3600 s in the future (clock skew allowed: 30 s)", "credentials"),
            ("security: replay record unreachable (Connection refused); not run", "other"),
            ("security is on but BULWARK_TRUST_FILE is not set (`bulwark keys init`)", "other"),
            ("something new", "other"),
        ],
    )  # fmt: skip
    def test_reason_to_kind(self, reason: str, kind: str) -> None:
        assert classify(reason) == kind
        assert kind in KINDS

    @pytest.mark.parametrize(
        "header",
        [
            "a string",
            {"iss": "w"},
            {"iss": 1, "kid": "k", "jti": "j", "sig": "s", "iat": 1, "exp": 2},
            {"iss": "w", "kid": "k", "jti": "0" * 32, "sig": "!!", "iat": 1, "exp": 2},
        ],
    )
    def test_every_malformed_signature_header_is_a_signature_refusal(self, header: object) -> None:
        reason = parse_claims(header)
        assert isinstance(reason, str)
        assert classify(f"security: {reason}") == "signature"
        assert classify(f"security: {parse_claims(None)}") == "unsigned"


@pytest.mark.integration
class TestRecordAndRead:
    """The script counts into buckets by (Redis) time, drops the old ones, and expires."""

    def test_buckets_by_time_and_kind(self, r: redis.Redis) -> None:
        for at, kind in [(NOW, "signature"), (NOW + 3, "signature"), (NOW + 9.9, "unsigned")]:
            refusals.record(r, kind, now=at)
        assert refusals.record(r, "signature", now=NOW - 0.5) == 1, "the bucket before"
        found = refusals.read(r.hgetall(REFUSALS_KEY), NOW + 5)
        assert found == (
            RefusalCount(kind="signature", start=NOW - BUCKET, count=1),
            RefusalCount(kind="signature", start=NOW, count=2),
            RefusalCount(kind="unsigned", start=NOW, count=1),
        )
        assert 0 < r.pttl(REFUSALS_KEY) <= BUCKET * (KEPT + 1) * 1000

    def test_old_buckets_are_dropped_and_not_read(self, r: redis.Redis) -> None:
        refusals.record(r, "replay", now=NOW)
        later = NOW + BUCKET * KEPT
        assert [c.kind for c in refusals.read(r.hgetall(REFUSALS_KEY), later)] == []
        refusals.record(r, "unsigned", now=later)
        fields = set(r.hkeys(REFUSALS_KEY))
        new = f"{int(later // BUCKET)}:unsigned".encode()
        assert fields == {new}, "the new bucket dropped the old"

    def test_a_real_redis_time_is_used_without_an_override(self, r: redis.Redis) -> None:
        before, _ = r.time()
        refusals.record(r, "unsigned")
        after, _ = r.time()
        (count,) = refusals.read(r.hgetall(REFUSALS_KEY), float(after))
        assert (count.kind, count.count) == ("unsigned", 1)
        assert before - BUCKET < count.start <= after

    def test_junk_fields_are_skipped(self) -> None:
        reply = {b"999:unsigned": b"2", b"nope": b"1", b"999:": b"1", b"999:replay": b"x"}
        assert refusals.read(reply, 9990.0) == (
            RefusalCount(kind="unsigned", start=9990.0, count=2),
        )


class TestCountRefusal:
    """A refusal is counted in the worker's metric; an unreachable Redis is logged, not raised."""

    @pytest.fixture
    def fresh(self, monkeypatch: pytest.MonkeyPatch) -> m.TaskMetrics:
        own = m.TaskMetrics(CollectorRegistry())
        monkeypatch.setattr(m, "metrics", lambda: own)
        return own

    def test_counted_in_redis_and_in_the_metric(self, r: redis.Redis, fresh: m.TaskMetrics) -> None:
        assert refusals.count_refusal("security: bad signature (producer 'x', key k)") == (
            "signature"
        )
        assert refused(fresh, "signature") == 1
        (field,) = r.hkeys(REFUSALS_KEY)
        assert isinstance(field, bytes) and field.endswith(b":signature")

    def test_unreachable_redis_is_logged(
        self, fresh: m.TaskMetrics, caplog: pytest.LogCaptureFixture
    ) -> None:
        # No `r` here: REDIS_URL points where nothing listens.
        with caplog.at_level(logging.WARNING, logger=refusals.__name__):
            assert refusals.count_refusal("security: replayed message (jti 1 already ran)") == (
                "replay"
            )
        assert "not counted fleet-wide" in caplog.text
        assert refused(fresh, "replay") == 1


@pytest.fixture
def counted(r: redis.Redis, redis_url: str) -> Iterator[redis.Redis]:
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=Counting)
    client = redis.Redis(connection_pool=pool)
    client.ping()
    yield client
    client.close()


@pytest.mark.integration
class TestSnapshot:
    """The fleet snapshot holds the recent buckets, still in three round trips."""

    def test_read_in_the_same_three_round_trips(self, r: redis.Redis, counted: redis.Redis) -> None:
        populate(r, breakers=2, bulkheads=1, services=1)
        seconds, _ = r.time()
        for kind in ("signature", "signature", "unsigned"):
            refusals.record(r, kind)
        refusals.record(r, "replay", now=float(seconds) - BUCKET * (KEPT + 2))  # too old
        read_fleet(counted, counted, QUEUES)
        before = Counting.sent
        snap = read_fleet(counted, counted, QUEUES)
        assert Counting.sent - before == 3
        assert snap.refusals_within(60) == {"signature": 2, "unsigned": 1}
        assert snap.as_dict()["security_refusals"][0]["kind"] in {"signature", "unsigned"}

    def test_refusals_within_looks_back_to_the_bucket(self) -> None:
        snap = fleet(("signature", 0, 1), ("signature", 60, 2), ("unsigned", 70, 4))
        assert snap.refusals_within(60) == {"signature": 3}, "the bucket 60 s back ends after"
        assert snap.refusals_within(80) == {"signature": 3, "unsigned": 4}
        assert FleetSnapshot(taken_at=NOW).refusals_within(60) == {}

    def test_fleet_gauge_per_kind(self) -> None:
        snap = fleet(("signature", 0, 3), ("replay", 10, 2), ("replay", 300, 9))
        samples = {
            s.labels["kind"]: s.value
            for family in fleet_families(snap)
            for s in family.samples
            if s.name == "bulwark_security_refusals_last_minute"
        }
        assert samples == {k: {"signature": 3, "replay": 2}.get(k, 0) for k in KINDS}


class TestRule:
    """A burst over the threshold within a minute fires; its kinds decide the severity."""

    def test_quiet_or_at_the_threshold_is_nothing(self) -> None:
        rule = SecurityRefusals(threshold=10)
        assert list(rule(observe())) == []
        assert list(rule(observe(("signature", 0, 6), ("unsigned", 10, 4)))) == []

    def test_forged_replayed_or_unauthorized_burst_is_critical(self) -> None:
        rule = SecurityRefusals(threshold=10)
        for kind in ("signature", "replay", "unauthorized"):
            (c,) = rule(observe((kind, 0, 1), ("unsigned", 10, 10)))
            assert (c.name, c.service, c.severity) == ("SecurityRefusals", "security", "critical")
            assert f"{kind} 1" in c.message and "unsigned 10" in c.message

    def test_other_bursts_warn_and_name_each_kind_and_count(self) -> None:
        (c,) = SecurityRefusals(threshold=10)(
            observe(("unsigned", 0, 7), ("credentials", 20, 3), ("other", 50, 1))
        )
        assert c.severity == "warning"
        assert c.message.startswith(
            "11 task messages refused by verification in the last 60 s (over 10): "
            "unsigned 7, credentials 3, other 1"
        )
        assert c.labels == {}, "one alert whatever the kinds: its severity follows them"

    def test_resolves_once_the_burst_leaves_the_window(self) -> None:
        rule = SecurityRefusals(threshold=10)
        burst = ("signature", 0, 50)
        assert len(list(rule(observe(burst)))) == 1
        # The same bucket, 75 s later: out of the window, nothing fires, the alert resolves.
        later = NOW + 75
        assert list(rule(observe(("signature", 75, 50), now=later))) == []

    def test_in_the_default_rules(self) -> None:
        rules = default_rules(get_settings())
        (rule,) = [x for x in rules if isinstance(x, SecurityRefusals)]
        assert rule.threshold == SECURITY_REFUSAL_THRESHOLD and rule.window == 60.0
        burst = observe(("replay", 0, SECURITY_REFUSAL_THRESHOLD + 1))
        found = [c for c in run_rules(rules, burst) if c.name == "SecurityRefusals"]
        assert [c.severity for c in found] == ["critical"]
