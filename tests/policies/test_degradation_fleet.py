"""Degradation across processes against the real redis-server: changes travel by pub/sub."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import redis

from policies.degradation import Degradation, Level
from policies.degradation.store import RedisDegradationStore
from policies.watch import feed_for
from tests.kit import poll
from tests.policies.test_degradation import count_steps
from tests.topologies import Sentinels
from workers.stores import connect

pytestmark = pytest.mark.integration

READY, SAW, ROUND_TRIPS = "test:{degr}:ready", "test:{degr}:saw", "test:{degr}:round-trips"


def _client(url: str) -> redis.Redis:
    return connect(url, master=Sentinels.NAME, socket_connect_timeout=0.5, socket_timeout=2.0)


def watcher_process(url: str) -> None:
    """Reads the level in a loop; reports what it saw and how many store calls it made."""
    client = _client(url)
    store = RedisDegradationStore(client)
    d = Degradation("search", store)
    d.level()
    assert feed_for(client).wait_healthy(10.0)
    d.level()  # cached from here on
    calls = count_steps(store)
    client.set(READY, 1)
    deadline = time.monotonic() + 20
    while d.level() is not Level.offline and time.monotonic() < deadline:
        time.sleep(0.002)
    # Both at once (one hash tag, one slot): the test reads the count as soon as SAW is there.
    client.mset({SAW: str(d.level()), ROUND_TRIPS: calls.count("snapshot")})
    d.set_level("degraded", "set by the other process")


class TestDegradationFleet:
    """A level set in one process is seen by another through pub/sub, with no reads meanwhile."""

    def test_level_change_crosses_processes(self, store_url: str) -> None:
        redis_url = store_url
        client = r = _client(redis_url)
        d = Degradation("search", RedisDegradationStore(client))
        assert d.level() is Level.full
        proc = multiprocessing.get_context("spawn").Process(
            target=watcher_process, args=(redis_url,)
        )
        proc.start()
        try:
            poll(lambda: r.get(READY), deadline=20, what="watcher ready")
            d.set_level("offline", "maintenance")
            assert (
                poll(lambda: r.get(SAW), deadline=10, what="watcher saw the change") == b"offline"
            )
            assert r.get(ROUND_TRIPS) == b"0"  # thousands of reads, all from the cache
            assert poll(lambda: d.level() is Level.degraded, deadline=10, what="change back")
            proc.join(10)
            assert proc.exitcode == 0
        finally:
            if proc.is_alive():
                proc.kill()
            client.close()
