"""ResilientTask on real workers: outages open the breaker once, nothing is dropped."""

from __future__ import annotations

import contextlib
import io

import pytest
import redis

from policies.breaker import list_breakers
from policies.bulkhead import Bulkhead, BulkheadConfig
from policies.deadletter import DeadLetterStore
from tasks.dependencies import dependency
from tests.kit import poll
from workers.client import client
from workers.ops.cli import main as bulwark

pytestmark = pytest.mark.integration

FAST = {
    "BULWARK_BREAKER_TIMEOUT": "2",
    "BULWARK_RETRY_BASE_DELAY": "0.05",
    "BULWARK_RETRY_MAX_DELAY": "0.3",
    "BULWARK_DEFER_MAX_DELAY": "0.5",
}


def breaker(r: redis.Redis, name: str):  # type: ignore[no-untyped-def]
    return next((b for b in list_breakers(r) if b.name == name), None)


def cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bulwark(list(args)) == 0
    return out.getvalue()


class TestOutage:
    """A failing dependency opens the breaker once; tasks are deferred, then all succeed."""

    def test_breaker_protects_the_dependency_and_loses_nothing(
        self, r: redis.Redis, start_worker
    ) -> None:
        start_worker(["payments"], name="payments", env=FAST)
        gateway = dependency("payments")
        gateway.set_outage(120)
        app = client()
        results = [app.send_task("payments.charge", args=[f"o{i}", 100]) for i in range(20)]
        poll(lambda: (b := breaker(r, "payments")) and b.state == "open", what="breaker open")
        calls_in_outage = gateway.calls()
        gateway.set_outage(0)
        for i, result in enumerate(results):
            value = result.get(timeout=60)
            assert value["order_id"] == f"o{i}"
            assert len(value["receipt"]) == 12, "the gateway's receipt"
        final = breaker(r, "payments")
        assert final is not None
        assert final.state == "closed"
        assert final.trips == 1, "the fleet opened the breaker once"
        # 5 consecutive failures open it; at most 2 more were already in flight.
        # Without the breaker: 20 tasks x 3 attempts = 60 calls to a dead gateway.
        assert calls_in_outage <= 7
        assert DeadLetterStore(r).count() == 0

    def test_full_bulkhead_defers_without_spending_retries(
        self, r: redis.Redis, start_worker
    ) -> None:
        start_worker(["payments"], name="payments", env=FAST)
        hold = Bulkhead("payments", r, BulkheadConfig(limit=4))
        leases = [hold.try_acquire() for _ in range(4)]
        result = client().send_task("payments.charge", args=["o1", 100])
        poll(lambda: result.state == "RETRY", what="the task to be deferred")
        assert dependency("payments").calls() == 0
        for lease in leases:
            lease.release()
        assert result.get(timeout=30)["order_id"] == "o1"
        assert client().backend.get_task_meta(result.id)["retries"] == 0


class TestDeadLetters:
    """What cannot succeed is kept with its reason, and can be replayed."""

    def test_permanent_failure_is_dead_lettered_and_replayable(
        self, r: redis.Redis, start_worker
    ) -> None:
        start_worker(["payments"], name="payments", env=FAST)
        result = client().send_task("payments.charge", args=["o-bad", 0])
        with pytest.raises(ValueError, match="amount_cents must be positive"):
            result.get(timeout=30)
        store = DeadLetterStore(r)
        (letter,) = store.latest()
        assert letter.task_name == "payments.charge"
        assert letter.task_id == result.id
        assert letter.args == ["o-bad", 0]
        assert letter.queue == "payments"
        assert "permanent" in letter.reason
        assert letter.error.startswith("ValueError")
        out = cli("deadletter", "replay", letter.id)
        assert "replayed payments.charge" in out
        replayed = poll(
            lambda: [x for x in store.latest() if x.id != letter.id],
            what="the replay to fail again",
        )
        assert store.get(letter.id) is None
        assert replayed[0].args == ["o-bad", 0]

    def test_deferral_budget_ends_in_the_dead_letter_store(
        self, r: redis.Redis, start_worker
    ) -> None:
        start_worker(["inventory"], name="general", env={**FAST, "BULWARK_DEFER_MAX": "2"})
        assert "forced_open" in cli("breaker", "open", "inventory")
        result = client().send_task("inventory.reserve", args=["sku-1", 1])
        (letter,) = poll(DeadLetterStore(r).latest, deadline=30, what="the dead letter")
        assert letter.task_id == result.id
        assert letter.reason.startswith("deferred 2 times, still refused: breaker 'inventory'")
        assert dependency("inventory").calls() == 0


class TestCallersFailures:
    """Bad input from callers is their failure, not the dependency's: the breaker stays closed."""

    def test_value_errors_do_not_open_the_breaker(self, r: redis.Redis, start_worker) -> None:
        start_worker(["payments"], name="payments", env=FAST)
        app = client()
        for i in range(6):
            with pytest.raises(ValueError):
                app.send_task("payments.charge", args=[f"o-bad-{i}", 0]).get(timeout=30)
        state = breaker(r, "payments")
        assert state is not None
        assert (state.state, state.failures, state.trips) == ("closed", 0, 0)
        assert app.send_task("payments.charge", args=["o-good", 100]).get(timeout=30)
        assert DeadLetterStore(r).count() == 6


class TestRetryBudget:
    """A spent fleet-wide retry budget stops retries: the task is deferred, not retried."""

    def test_no_budget_no_retry(self, r: redis.Redis, start_worker) -> None:
        spent = {"BULWARK_RETRY_BUDGET_MIN": "0", "BULWARK_RETRY_BUDGET_RATIO": "0",
                 "BULWARK_DEFER_MAX": "1"}  # fmt: skip
        start_worker(["payments"], name="payments", env={**FAST, **spent})
        gateway = dependency("payments")
        gateway.set_outage(60)
        result = client().send_task("payments.charge", args=["o-1", 100])
        (letter,) = poll(DeadLetterStore(r).latest, deadline=30, what="the dead letter")
        assert letter.task_id == result.id
        assert letter.reason.startswith("deferred 1 times, still refused: retry-budget 'payments'")
        # One call per delivery: the first, and the one after the deferral. With the budget
        # ignored it would be the three attempts of the retry policy.
        assert gateway.calls() == 2


class TestDegradation:
    """A service set offline answers from the task's fallback; back to full, it runs again."""

    def test_offline_service_uses_the_fallback(self, r: redis.Redis, start_worker) -> None:
        start_worker(["notifications"], name="general", env=FAST)
        cli("degrade", "notifications", "offline")
        app = client()
        kept = app.send_task("notifications.send", args=["a@example.test", "receipt"])
        assert kept.get(timeout=30) == {
            "recipient": "a@example.test",
            "template": "receipt",
            "sent": False,
            "kept_for_later": True,
        }
        assert dependency("notifications").calls() == 0
        cli("degrade", "notifications", "full")
        sent = app.send_task("notifications.send", args=["b@example.test", "receipt"])
        poll(lambda: sent.ready(), deadline=30, what="the send after recovery")
        assert sent.get()["sent"] is True
