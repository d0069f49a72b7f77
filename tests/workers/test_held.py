"""A finished call's after-step, held for the process's next acquire (`workers.held`):
release before acquire in one round trip, sent alone within `HOLD_WITHIN` when no acquire
comes, sent at exit, and never lost behind a step that goes at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from policies import events
from policies.breaker import list_breakers
from policies.bulkhead import Bulkhead, BulkheadConfig, Lease, list_bulkheads
from policies.bulkhead.store import Results
from policies.retry import RetryPolicy
from tests.conftest import StartWorker
from tests.kit import poll
from tests.workers.test_guard import FakeTask
from workers import held as held_module
from workers import resources
from workers.client import client
from workers.guard import Guard
from workers.held import HOLD_WITHIN, Held, Step
from workers.ops.embedded import EmbeddedRedis
from workers.settings import get_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _bulkhead(r: redis.Redis, name: str = "held") -> Bulkhead:
    return Bulkhead(name, r, BulkheadConfig(limit=1), emitter=events.Emitter())


def _release(bulkhead: Bulkhead, lease: Lease, settled: list[object]) -> Step:
    def step(pipe: redis.client.Pipeline) -> Callable[[Results], None]:
        pending = bulkhead.release_in(pipe, lease)

        def settle(results: Results) -> None:
            settled.append(pending.finish(results))

        return settle

    return step


def _commands(r: redis.Redis) -> int:
    """Commands the server has processed (an INFO counts itself)."""
    return int(r.info("stats")["total_commands_processed"])


def test_a_held_release_goes_before_the_next_acquire(r: redis.Redis) -> None:
    """Limit 1: the second acquire passes only if the held release reached Redis first."""
    held, settled = Held(r, within=3600), list[object]()  # no flusher in the way
    bulkhead = _bulkhead(r)
    lease = bulkhead.try_acquire(renew=False)
    held.hold(_release(bulkhead, lease, settled))
    assert bulkhead.snapshot().in_use == 1  # held, not sent
    with held.sending:
        second = bulkhead.try_acquire(renew=False, prelude=held.prelude)
    assert settled == [True]  # the first lease was freed, in the acquire's round trip
    assert not held.pending()
    assert second.holder != lease.holder
    assert bulkhead.snapshot().in_use == 1


def test_what_is_held_goes_alone_within_hold_within(r: redis.Redis) -> None:
    held, settled = Held(r), list[object]()
    bulkhead = _bulkhead(r, "alone")
    lease = bulkhead.try_acquire(renew=False)
    started = time.monotonic()
    held.hold(_release(bulkhead, lease, settled))
    poll(lambda: settled, deadline=5, every=0.001, what="the held release sent")
    assert time.monotonic() - started >= HOLD_WITHIN * 0.9  # by the flusher, when due
    assert settled == [True]
    assert bulkhead.snapshot().in_use == 0


def test_a_step_sent_at_once_goes_behind_what_is_held(r: redis.Redis) -> None:
    held, order = Held(r, within=3600), list[str]()

    def step(tag: str) -> Step:
        def queue(pipe: redis.client.Pipeline) -> Callable[[Results], None]:
            pipe.rpush("order", tag)
            return lambda results: order.append(tag)

        return queue

    held.hold(step("held-1"))
    held.hold(step("held-2"))
    before = _commands(r)
    held.send(step("failure"))
    assert _commands(r) - before == 4  # three RPUSHes and the INFO: nothing else
    assert r.lrange("order", 0, -1) == [b"held-1", b"held-2", b"failure"]
    assert order == ["held-1", "held-2", "failure"]


def test_what_is_held_is_sent_when_the_process_exits(r: redis.Redis, redis_url: str) -> None:
    script = textwrap.dedent(f"""
        import redis
        from workers.held import held
        h = held()
        h.within = 3600  # only the exit sends it
        h.hold(lambda pipe: (pipe.set("sent-at-exit", "yes"), lambda results: None)[1])
        assert redis.Redis.from_url({redis_url!r}).get("sent-at-exit") is None
    """)
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True, timeout=60)
    assert r.get("sent-at-exit") == b"yes"


def test_a_worker_gone_idle_books_every_call_and_frees_every_lease(
    r: redis.Redis, start_worker: StartWorker
) -> None:
    """Real worker: each success's step rides with the next acquire; the last one, with no
    acquire after it, is sent by the flusher. None is lost."""
    start_worker(["inventory"], name="held", concurrency=2)
    app = client()
    sent = [app.send_task("inventory.reserve", args=[f"h{i}", 1]) for i in range(20)]
    assert [s.get(timeout=30)["sku"] for s in sent] == [f"h{i}" for i in range(20)]

    def settled() -> bool:
        (breaker,) = [b for b in list_breakers(r) if b.name == "inventory"]
        (bulkhead,) = [b for b in list_bulkheads(r) if b.name == "inventory"]
        return breaker.window_calls == 20 and bulkhead.in_use == 0

    poll(settled, deadline=5, every=0.01, what="20 calls booked, no lease held")


class TestParkedLeases:
    """The guard parks a success's lease for the process's next call on the bulkhead."""

    @staticmethod
    def guarded(r: redis.Redis, limit: int, held: Held) -> tuple[Guard, Bulkhead]:
        bulkhead = Bulkhead("parked", r, BulkheadConfig(limit=limit), emitter=events.Emitter())
        parts: dict[str, Any] = {"breaker": None, "service": None, "budget": None}
        return Guard(bulkhead=bulkhead, retry=RetryPolicy.from_settings(), defer_max=5,
                     defer_cap=60.0, client=r, held=held, **parts), bulkhead  # fmt: skip

    def parked_after_an_early_step(
        self, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> tuple[Held, Guard, Bulkhead]:
        """A call's lease parked, its step sent early: the lease stays parked (the flusher
        gives nothing back during a test)."""
        monkeypatch.setattr(held_module, "PARK_FOR", 3600.0)
        held = Held(r, within=60)
        guard, bulkhead = self.guarded(r, 2, held)
        guard.run(FakeTask(body=lambda: None), (), {})
        held.send()
        assert bulkhead.snapshot().in_use == 1
        return held, guard, bulkhead

    def test_a_busy_process_keeps_its_permit_from_call_to_call(self, r: redis.Redis) -> None:
        held = Held(r, within=3600)  # only `send` gives it back
        guard, bulkhead = self.guarded(r, 2, held)
        guard.run(FakeTask(body=lambda: None), (), {})
        (holder,) = bulkhead.snapshot().holders
        before = _commands(r)
        guard.run(FakeTask(body=lambda: None), (), {})
        assert _commands(r) - before == 1, "no command but the INFO that counts them"
        assert list(bulkhead.snapshot().holders) == [holder], "the same permit, taken over"
        held.send(leave=True)  # a process leaving gives back what it parked
        assert bulkhead.snapshot().in_use == 0

    def test_a_parked_permit_outlives_a_step_sent_early(self, r: redis.Redis) -> None:
        """The step goes (with another call's acquire, or behind earlier steps) before its
        lease was parked `within`: the lease stays for the next call, and is given back
        `within` after it was parked, by the flusher."""
        within = 0.3
        held = Held(r, within=within)
        guard, bulkhead = self.guarded(r, 2, held)
        before = time.monotonic()  # the lease is parked after this, inside the call
        guard.run(FakeTask(body=lambda: None), (), {})
        held.send()  # early: the breaker's and budget's part go, the lease stays
        assert bulkhead.snapshot().in_use == 1
        poll(lambda: bulkhead.snapshot().in_use == 0, deadline=5, every=0.01,
             what="the parked permit given back when due")  # fmt: skip
        assert time.monotonic() - before >= within
        assert held.take("parked") is None

    def test_a_parked_permit_too_old_to_take_over_goes_back_before_the_next_acquire(
        self, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Its step went early, so it stayed parked; then it grew too old to take over.
        The next call releases it before it acquires: never two permits of one bulkhead."""
        _, guard, bulkhead = self.parked_after_an_early_step(r, monkeypatch)
        other = bulkhead.try_acquire(renew=False)  # somebody else holds the other permit
        monkeypatch.setattr(held_module, "PARK_FOR", 0.0)  # too old to take over now
        ran: list[bool] = []
        guard.run(FakeTask(body=lambda: ran.append(True)), (), {})  # room if it went first
        assert ran == [True], "not deferred: the bulkhead had the parked permit back"
        # The new permit was taken from a full bulkhead: not parked, given back at once.
        assert list(bulkhead.snapshot().holders) == [other.holder]

    def test_a_release_that_cannot_be_queued_loses_no_held_step(
        self, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        held, _, bulkhead = self.parked_after_an_early_step(r, monkeypatch)

        def good(pipe: redis.client.Pipeline) -> Callable[[Results], None]:
            pipe.set("good", "sent")
            return lambda results: None

        held.hold(good)
        monkeypatch.setattr(bulkhead, "release_in", _raising_release)
        held.send(leave=True)
        assert r.get("good") == b"sent"

    def test_a_permit_taken_from_a_full_bulkhead_goes_back_at_once(self, r: redis.Redis) -> None:
        guard, bulkhead = self.guarded(r, 1, Held(r, within=3600))
        guard.run(FakeTask(body=lambda: None), (), {})
        assert bulkhead.snapshot().in_use == 0, "others may wait: not parked, not held"

    def test_a_permit_is_taken_over_for_park_for_at_most(
        self, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(held_module, "PARK_FOR", 0.0)
        held = Held(r, within=3600)
        guard, bulkhead = self.guarded(r, 2, held)
        guard.run(FakeTask(body=lambda: None), (), {})
        (first,) = bulkhead.snapshot().holders
        guard.run(FakeTask(body=lambda: None), (), {})  # releases the first as it acquires
        (second,) = bulkhead.snapshot().holders
        assert second != first


def _raising_release(pipe: redis.client.Pipeline, lease: Lease) -> Any:
    raise redis.exceptions.SlotNotCoveredError("no node serves the slot (a failover)")


def _raising(pipe: redis.client.Pipeline) -> Callable[[Results], None]:
    raise redis.exceptions.SlotNotCoveredError("no node serves the slot (a failover)")


def test_a_step_that_cannot_be_queued_does_not_take_the_others_down(r: redis.Redis) -> None:
    held, order = Held(r, within=3600), list[str]()

    def good(pipe: redis.client.Pipeline) -> Callable[[Results], None]:
        pipe.set("good", "sent")
        return lambda results: order.append("settled")

    held.hold(_raising)
    held.hold(good)
    held.send()
    assert r.get("good") == b"sent" and order == ["settled"]
    assert not held.pending()


def test_a_parked_lease_whose_step_was_lost_is_released(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(held_module, "ORPHAN_AFTER", 0.05)
    held = Held(r)
    bulkhead = _bulkhead(r, "orphan")
    lease = bulkhead.try_acquire(renew=False)
    held.park(lease)
    held.hold(_raising)  # its step, lost: it cannot be queued
    poll(lambda: bulkhead.snapshot().in_use == 0, deadline=5, every=0.01,
         what="the orphaned lease released by the flusher")  # fmt: skip
    assert held.take("orphan") is None


def test_settings_pointed_elsewhere_get_their_own_held_steps(
    redis_url: str, spare_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    get_settings.cache_clear()
    resources.forget()
    first = held_module.held()
    assert first.client.connection_pool.connection_kwargs["port"] != spare_redis.port
    monkeypatch.setenv("REDIS_URL", spare_redis.url)
    get_settings.cache_clear()
    resources.forget()
    second = held_module.held()
    assert second is not first
    assert second.client.connection_pool.connection_kwargs["port"] == spare_redis.port
    assert held_module.held() is second
    get_settings.cache_clear()
    resources.forget()
