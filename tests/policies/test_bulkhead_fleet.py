"""The bulkhead against the real redis-server: several processes, dead holders, outages."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from policies import events
from policies.bulkhead import Bulkhead, BulkheadConfig
from policies.bulkhead.policy import FALLBACK_MODE
from policies.errors import BulkheadFull
from policies.watch import feed_for
from tests.kit import poll
from tests.topologies import Sentinels
from workers.ops.embedded import EmbeddedRedis
from workers.stores import connect

pytestmark = pytest.mark.integration

LIMIT, TTL = 4, 0.5
# One hash tag: the ENTER script takes two of them (a cluster runs it on one slot).
COUNTER, HIGHEST, RESULTS = "test:{bh}:inside", "test:{bh}:highest", "test:{bh}:results"
# Enter/leave the critical section, keeping the highest number of holders ever inside.
ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


def _client(url: str) -> redis.Redis:
    return connect(url, master=Sentinels.NAME, socket_connect_timeout=0.5, socket_timeout=1.0)


def _holder(url: str, bulkhead: Bulkhead, hold: float, start: threading.Barrier) -> None:
    client = _client(url)
    start.wait()
    try:
        with bulkhead.acquire(max_wait=60.0) as lease:
            client.eval(ENTER, 2, COUNTER, HIGHEST)
            threading.Event().wait(hold)  # the work: outlives the lease TTL when hold > TTL
            client.decr(COUNTER)
            lost = lease.lost or lease.local
        client.rpush(RESULTS, "lost" if lost else "ok")
    except Exception as exc:
        client.rpush(RESULTS, f"error: {exc!r}")


def fleet_process(url: str, threads: int) -> None:
    """One worker process: `threads` holders of the shared bulkhead, half of them long."""
    bulkhead = Bulkhead("fleet", _client(url), BulkheadConfig(limit=LIMIT, lease_ttl=TTL))
    start = threading.Barrier(threads)
    holds = [1.5 if i % 2 else 0.2 for i in range(threads)]
    workers = [threading.Thread(target=_holder, args=(url, bulkhead, h, start)) for h in holds]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def hold_forever(url: str) -> None:
    """Take a permit (renewed), say so, and wait to be killed."""
    client = _client(url)
    Bulkhead("victim", client, BulkheadConfig(limit=1, lease_ttl=TTL)).try_acquire()
    client.rpush(RESULTS, "held")
    threading.Event().wait(60.0)


@pytest.fixture
def spawn() -> Iterator[multiprocessing.context.SpawnContext]:
    ctx = multiprocessing.get_context("spawn")
    yield ctx
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5.0)


class TestFleetLimit:
    """A limit of 4 is never exceeded by 16 holders in 2 processes, even past the lease TTL."""

    def test_limit_holds_across_processes(
        self, store_url: str, spawn: multiprocessing.context.SpawnContext
    ) -> None:
        r = _client(store_url)
        children = [spawn.Process(target=fleet_process, args=(store_url, 8)) for _ in range(2)]
        for child in children:
            child.start()
        for child in children:
            child.join(60.0)
        assert [child.exitcode for child in children] == [0, 0]
        results = sorted(x.decode() for x in r.lrange(RESULTS, 0, -1))
        assert results == ["ok"] * 16  # every holder got a permit and never lost it
        highest = int(r.get(HIGHEST) or 0)
        assert 2 <= highest <= LIMIT
        assert int(r.get(COUNTER) or 0) == 0


class TestDeadHolder:
    """A SIGKILLed holder's permit returns once its lease TTL has passed."""

    def test_killed_holder_frees_its_permit(
        self, r: redis.Redis, redis_url: str, spawn: multiprocessing.context.SpawnContext
    ) -> None:
        child = spawn.Process(target=hold_forever, args=(redis_url,))
        child.start()
        assert r.blpop([RESULTS], timeout=30) is not None
        bulkhead = Bulkhead("victim", r, BulkheadConfig(limit=1, lease_ttl=TTL))
        threading.Event().wait(2 * TTL)  # the child's renewals keep it past its TTL
        with pytest.raises(BulkheadFull):
            bulkhead.try_acquire(renew=False)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10.0)
        poll(lambda: bulkhead.snapshot().available == 1, deadline=10, what="permit back")
        assert bulkhead.try_acquire(renew=False).release() is True


class TestRenewalThread:
    """The background renewal keeps a lease past its TTL, and reports a lease it lost.

    The TTL is 1 s, renewed every third of it: a lease is lost only if the renewer
    thread stalls for over 0.6 s (a 0.3 s TTL lost leases to a loaded CI machine).
    """

    TTL = 1.0

    def test_lost_lease_is_visible_and_reported(self, r: redis.Redis) -> None:
        recorder = events.Recorder()
        config = BulkheadConfig(limit=1, lease_ttl=self.TTL)
        bulkhead = Bulkhead("renewed", r, config, emitter=events.Emitter(recorder))
        lease = bulkhead.try_acquire()
        threading.Event().wait(2.5 * self.TTL)  # > 2 TTLs
        assert not lease.lost and bulkhead.snapshot().holders == (lease.holder,)
        r.delete("bulwark:{bulkhead:renewed}:leases")  # as if Redis had lost it
        poll(lambda: lease.lost, deadline=5, what="lease.lost")
        assert [e.action for e in recorder.of(events.BulkheadChanged)] == ["acquired", "lost"]  # type: ignore[attr-defined]
        assert lease.release() is False

    def test_one_thread_renews_every_lease_until_released(self, r: redis.Redis) -> None:
        config = BulkheadConfig(limit=12, lease_ttl=self.TTL)
        bulkheads = [Bulkhead(f"many-{i}", r, config, emitter=events.Emitter()) for i in range(2)]
        leases = [b.try_acquire() for b in bulkheads for _ in range(6)]
        renewers = [t for t in threading.enumerate() if t.name == "bulkhead-renewer"]
        assert len(renewers) == 1  # one per process, not one per lease
        for lease in leases[::2]:
            lease.release()
        threading.Event().wait(2.5 * self.TTL)  # > 2 TTLs: only renewal keeps a lease alive
        assert not [lease for lease in leases if lease.lost]
        kept = {lease.holder for lease in leases[1::2]}
        assert {h for b in bulkheads for h in b.snapshot().holders} == kept
        assert all(lease.release() is True for lease in leases[1::2])


class TestPipelinedRelease:
    """A release queued into a caller's pipeline costs no extra command, and survives NOSCRIPT."""

    @staticmethod
    def release_piped(r: redis.Redis, before: Callable[[], object]) -> tuple[Bulkhead, list[Any]]:
        """Take a permit, run `before`, then release it in a pipeline with an INCR."""
        bulkhead = Bulkhead("piped", r, BulkheadConfig(limit=1))
        lease = bulkhead.try_acquire(renew=False)
        before()
        with r.pipeline(transaction=False) as pipe:
            pending = bulkhead.release_in(pipe, lease)
            pipe.incr("test:other-script-result")
            results = pipe.execute(raise_on_error=False)
        assert pending.finish(results) is True
        assert bulkhead.release(lease) is False and results[1] >= 1
        return bulkhead, results

    def test_release_shares_the_round_trip(self, r: redis.Redis) -> None:
        self.release_piped(r, lambda: None)  # the first one on a client is an EVAL of the source
        bulkhead, results = self.release_piped(r, r.config_resetstat)
        stats = r.info("commandstats")
        assert "cmdstat_script|exists" not in stats and "cmdstat_script" not in stats
        assert "cmdstat_eval" not in stats and stats["cmdstat_evalsha"]["calls"] == 1
        assert bulkhead.snapshot().in_use == 0 and results[1] == 2  # the second INCR

    def test_noscript_falls_back_to_a_direct_release(self, r: redis.Redis) -> None:
        self.release_piped(r, lambda: None)  # queueing loads the script, the first time only
        bulkhead, results = self.release_piped(r, r.script_flush)  # as if the server restarted
        assert isinstance(results[0], redis.exceptions.NoScriptError)
        assert bulkhead.snapshot().in_use == 0


class TestRedisOutage:
    """With Redis down the bulkhead keeps a local limit, says so, and returns to Redis after."""

    def test_local_fallback_then_restore(self, r: redis.Redis, redis_server: EmbeddedRedis) -> None:
        recorder = events.Recorder()
        config = BulkheadConfig(limit=2, lease_ttl=5.0, probe_interval=0.1, poll_interval=0.05)
        client = _client(redis_server.url)
        bulkhead = Bulkhead("outage", client, config, emitter=events.Emitter(recorder))
        shared = bulkhead.try_acquire(renew=True)
        assert not shared.local
        redis_server.kill()
        try:
            local = [bulkhead.try_acquire(renew=True), bulkhead.acquire(max_wait=1.0)]
            assert [lease.local for lease in local] == [True, True]
            with pytest.raises(BulkheadFull):
                bulkhead.acquire(max_wait=0.3)  # the local limit holds, and waiting ends
            snap = bulkhead.snapshot()
            assert snap.local and snap.in_use == 2
            assert local[0].release() is True  # released locally
            assert shared.release() is False  # Redis unreachable: left to its TTL
            down = recorder.of(events.StoreUnavailable)
            assert len(down) == 1 and down[0].mode == FALLBACK_MODE  # type: ignore[attr-defined]
        finally:
            redis_server.restart()
        back = poll(lambda: _shared_lease(bulkhead), deadline=10, what="shared state again")
        assert len(recorder.of(events.StoreRestored)) == 1
        snap = bulkhead.snapshot()
        assert not snap.local and snap.holders == (back.holder,)
        assert local[1].release() is True  # a local lease still goes back to the local store
        feed_for(client).close()
        client.close()


def _shared_lease(bulkhead: Bulkhead) -> object:
    lease = bulkhead.try_acquire(renew=False)
    if lease.local:
        lease.release()
        return None
    return lease
