"""The breaker across processes and threads on the real redis-server, and through an outage."""

from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
from typing import Any

import pytest
import redis

from policies import events
from policies.breaker import (
    BreakerConfig,
    CircuitBreaker,
    Permit,
    RedisBreakerStore,
    consecutive_failures,
)
from policies.errors import CircuitOpen
from tests.kit import poll
from tests.topologies import Sentinels
from workers.ops.embedded import EmbeddedRedis
from workers.stores import connect

pytestmark = pytest.mark.integration

SPAWN = multiprocessing.get_context("spawn")
PROCESSES, THREADS = 3, 4


def _breaker(
    url: str, name: str, emitter: events.Emitter | None = None, **options: Any
) -> CircuitBreaker:
    client = connect(url, master=Sentinels.NAME, socket_connect_timeout=0.5, socket_timeout=1.0)
    return CircuitBreaker(
        name, BreakerConfig(**options), RedisBreakerStore(client), emitter=emitter
    )


def _failing_calls(url: str, name: str, barrier: Any, out: Any) -> None:
    """A process whose threads call a dependency that always fails, until refused."""
    recorder = events.Recorder()
    breaker = _breaker(url, name, events.Emitter(recorder), open_timeout=60.0)
    refused = [0] * THREADS

    def run(i: int) -> None:
        barrier.wait()
        for _ in range(200):
            try:
                permit = breaker.acquire()
            except CircuitOpen:
                refused[i] += 1
                if refused[i] >= 3:
                    return
                continue
            breaker.record(permit, success=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    opened = [
        e for e in recorder.of(events.BreakerTransition)
        if isinstance(e, events.BreakerTransition) and e.to_state == "open"
    ]  # fmt: skip
    out.put((os.getpid(), len(opened), min(refused)))


def _trial_calls(url: str, name: str, start: Any, done: Any, out: Any) -> None:
    """A process whose threads all try to get a half-open trial slot at once."""
    breaker = _breaker(url, name, events.Emitter(), success_threshold=3, trial_ttl=30.0)
    held: list[Permit] = []
    lock = threading.Lock()

    def run() -> None:
        start.wait()
        for _ in range(50):
            try:
                permit = breaker.acquire()
            except CircuitOpen:
                continue
            with lock:
                held.append(permit)  # the call "reaches the dependency" and is still running

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(len(held))
    done.wait()  # every process has counted: now let the trial calls succeed
    for permit in held:
        breaker.record(permit, success=True)
    out.put("recorded")


def _hold_a_trial(url: str, name: str, out: Any) -> None:
    """Take a trial slot and never give it back (the parent SIGKILLs this process)."""
    breaker = _breaker(url, name, events.Emitter(), success_threshold=1, trial_ttl=1.5)
    permit = breaker.acquire()
    out.put(permit.trial)
    threading.Event().wait(60)


def _trip(url: str, name: str, out: Any) -> None:
    breaker = _breaker(url, name, events.Emitter(), trip=consecutive_failures(2))
    for _ in range(2):
        breaker.record(breaker.acquire(), success=False)
    out.put(breaker.snapshot().state)


def _admitted(breaker: CircuitBreaker) -> Permit | None:
    """The permit, or None when the breaker refuses (for polls)."""
    try:
        return breaker.acquire()
    except CircuitOpen:
        return None


def _run(target: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _trip_now(url: str, name: str, **options: Any) -> CircuitBreaker:
    breaker = _breaker(url, name, events.Emitter(), trip=consecutive_failures(1), **options)
    breaker.record(breaker.acquire(), success=False)
    return breaker


class TestFleet:
    """Several processes with several threads share one breaker through Redis."""

    def test_opens_once_for_the_whole_fleet(self, store_url: str) -> None:
        name = f"fleet-{uuid.uuid4().hex[:8]}"
        barrier, out = SPAWN.Barrier(PROCESSES * THREADS), SPAWN.Queue()
        procs = [_run(_failing_calls, store_url, name, barrier, out) for _ in range(PROCESSES)]
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
        assert sum(opened for _, opened, _ in results) == 1  # one closed->open, fleet-wide
        assert all(refused >= 3 for _, _, refused in results)  # every process saw it open
        assert _breaker(store_url, name).snapshot().trips == 1

    def test_half_open_admits_exactly_k_trials(self, store_url: str) -> None:
        redis_url = store_url
        name = f"trials-{uuid.uuid4().hex[:8]}"
        probe = _trip_now(redis_url, name, open_timeout=0.5)
        start, done, out = (
            SPAWN.Barrier(PROCESSES * THREADS + 1),  # the threads and this test
            SPAWN.Barrier(PROCESSES + 1),
            SPAWN.Queue(),
        )
        procs = [_run(_trial_calls, redis_url, name, start, done, out) for _ in range(PROCESSES)]
        poll(lambda: probe.snapshot().retry_after == 0, deadline=10, what="open timeout over")
        start.wait(30)
        admitted = [out.get(timeout=60) for _ in procs]
        done.wait(30)
        assert sum(admitted) == 3
        assert [out.get(timeout=30) for _ in procs] == ["recorded"] * PROCESSES
        for p in procs:
            p.join(10)
        assert probe.snapshot().state == "closed"

    def test_a_killed_holders_trial_slot_frees_after_its_ttl(
        self, redis_url: str, r: redis.Redis
    ) -> None:
        name = f"kill-{uuid.uuid4().hex[:8]}"
        probe = _trip_now(redis_url, name, open_timeout=0.3, success_threshold=1, trial_ttl=1.5)
        poll(lambda: probe.snapshot().retry_after == 0, deadline=10, what="open timeout over")
        out = SPAWN.Queue()
        holder = _run(_hold_a_trial, redis_url, name, out)
        assert out.get(timeout=30) is True
        holder.kill()
        holder.join(10)
        with pytest.raises(CircuitOpen) as caught:
            probe.acquire()
        assert caught.value.state == "half_open"
        permit = poll(
            lambda: _admitted(probe), deadline=10, what="the dead holder's slot to expire"
        )
        assert permit.trial
        probe.record(permit, success=True)
        assert probe.snapshot().state == "closed"

    def test_open_state_reaches_another_process(self, store_url: str) -> None:
        """Through the change feed: pub/sub on one Redis, a cluster, a sentinel master."""
        redis_url = store_url
        name = f"feed-{uuid.uuid4().hex[:8]}"
        here = _breaker(redis_url, name, events.Emitter(), trip=consecutive_failures(2))
        here.record(here.acquire())
        poll(lambda: here.store.cache_trusted(), deadline=5, what="change feed subscribed")
        here.record(here.acquire())
        assert here.acquire().source == "cache"  # closed, known locally: no round trip
        out = SPAWN.Queue()
        proc = _run(_trip, redis_url, name, out)
        assert out.get(timeout=30) == "open"
        proc.join(10)
        poll(
            lambda: _admitted(here) is None,
            deadline=5,
            what="this process to learn the breaker opened",
        )


class TestOutage:
    """With Redis down, breakers run locally (fail_open) or refuse (fail_closed), then resync."""

    def test_redis_stops_and_returns(self, redis_server: EmbeddedRedis, r: redis.Redis) -> None:
        name = f"outage-{uuid.uuid4().hex[:8]}"
        recorder = events.Recorder()
        emitter = events.Emitter(recorder)
        opts: dict[str, Any] = {"trip": consecutive_failures(3), "store_retry_interval": 0.2}
        lenient = _breaker(redis_server.url, name, emitter, **opts)
        strict = _breaker(
            redis_server.url, name + "-strict", emitter, on_store_error="fail_closed", **opts
        )
        for b in (lenient, strict):
            b.record(b.acquire())
        redis_server.kill()
        try:
            # Until the change feed notices, a cached "closed" still admits without Redis.
            for b in (lenient, strict):  # each has its own client, so its own feed
                poll(lambda b=b: not b.store.cache_trusted(), deadline=5, what="feed sees outage")
            permits = [lenient.acquire() for _ in range(3)]
            assert {p.source for p in permits} == {"local"}
            for p in permits:
                lenient.record(p, success=False)
            with pytest.raises(CircuitOpen) as local_open:
                lenient.acquire()
            assert local_open.value.state == "open"  # the local breaker tripped on its own
            with pytest.raises(CircuitOpen) as refused:
                strict.acquire()
            assert refused.value.state == "store_unavailable"
            assert lenient.snapshot().source == "local"
            down = [e.name for e in recorder.of(events.StoreUnavailable)]
            assert sorted(down) == sorted([name, name + "-strict"])  # once per outage each
        finally:
            redis_server.restart()
        for b in (lenient, strict):
            permit = poll(lambda b=b: _admitted(b), deadline=15, what=f"{b.name} back on Redis")
            assert permit.source in ("redis", "cache")
        restored = {e.name for e in recorder.of(events.StoreRestored)}
        assert restored == {name, name + "-strict"}
        snap = lenient.snapshot()
        assert (snap.source, snap.state) == ("redis", "closed")  # Redis' state, not the local one
        assert r.ping()
