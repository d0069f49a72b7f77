"""The whole fleet on Redis Sentinel (broker, result backend and policy store), with a real
worker: tasks run end to end, and when the master is SIGKILLed mid-run the sentinels
promote the replica, the worker reconnects, no task is lost and the breakers' state
survives (the replica's copy)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.transport import resolve_transport
from redis.sentinel import MasterNotFoundError

from policies.breaker import list_breakers
from tests.kit import Worker, poll
from tests.topologies import FAILOVER_ENV, Sentinels
from workers.client import client
from workers.settings import Settings
from workers.stores import connect
from workers.transport import GuardedSentinelTransport

pytestmark = pytest.mark.integration

FAST = {**FAILOVER_ENV, "BULWARK_SENTINEL_MASTER": Sentinels.NAME}


def outcome(result: AsyncResult, failures: list[str], deadline: float = 90) -> Any:
    """The task's result. Celery's result consumer raises while the master is gone
    (ConnectionError, then MasterNotFoundError until the sentinels agree on a new one,
    sometimes wrapped in kombu's OperationalError): a caller asks again, as here.

    Each poll reads the result anew and notes a FAILURE it sees in `failures` (a task whose
    retry could not be published while the broker was away was stored as FAILURE; its
    message now goes back on its queue instead)."""

    def got() -> Any:
        fresh = result.app.AsyncResult(result.id)
        try:
            value = fresh.get(timeout=10, propagate=False)
        except (redis.ConnectionError, MasterNotFoundError, OperationalError):
            return None
        if fresh.state == "FAILURE":
            failures.append(f"{result.id}: {value!r}")
            return None
        return value

    return poll(got, deadline=deadline, every=0.2, what=f"the result of {result.id}")


def test_the_fleet_survives_a_master_failover(
    r: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = Sentinels().start()  # its own: this test kills the master
    try:
        monkeypatch.setenv("BULWARK_SENTINEL_MASTER", Sentinels.NAME)
        worker = Worker(
            group.url, ["inventory"], name="sentinel", env=FAST, log=tmp_path / "worker.log"
        ).start()
        try:
            settings = Settings.from_env({"REDIS_URL": group.url, **FAST})
            app = client(settings)
            assert app.conf.broker_transport_options["master_name"] == Sentinels.NAME
            # A failover to the next sentinel URL stays on the guarded transport.
            assert resolve_transport("sentinel") is GuardedSentinelTransport
            first = app.send_task("inventory.reserve", args=["first", 1]).get(timeout=30)
            assert first["sku"] == "first"
            shared = connect(group.url, master=Sentinels.NAME)
            poll(  # booked with the worker's next round trip, or within workers.held's 10 ms
                lambda: any(
                    b.name == "inventory" and b.window_calls for b in list_breakers(shared)
                ),
                deadline=10,
                what="the call booked on the shared breaker",
            )
            assert group.master is not None and group.replica is not None
            old, new = group.master.port, group.replica.port

            sent = [app.send_task("inventory.reserve", args=[f"a{i}", 1]) for i in range(20)]

            def kill_after_five() -> None:
                poll(lambda: sum(s.ready() for s in sent) >= 5, deadline=60, what="5 done")
                assert group.master is not None
                group.master.kill()

            killer = threading.Thread(target=kill_after_five)
            killer.start()
            failures: list[str] = []
            done: dict[str, str] = {}
            end = time.monotonic() + 90
            for result in sent:
                try:
                    left = max(end - time.monotonic(), 1.0)
                    done[result.id] = outcome(result, failures, deadline=left)["sku"]
                except AssertionError:
                    pass  # its result never came: did the task run? (below)
            killer.join()
            missing = [s.id for s in sent if s.id not in done]
            # Redis replicates asynchronously: a result written just before the master died
            # can be lost with it (the promoted replica never had it). The task still ran
            # once: the worker logged it as succeeded. Not run at all would be a lost task.
            ran = worker.log.read_text(errors="replace")
            not_run = [i for i in missing if f"[{i}] succeeded" not in ran]
            if not_run:  # say where the lost task's message is
                master = connect(group.url, master=Sentinels.NAME)
                where = {
                    "queued": [m for m in master.lrange("inventory", 0, -1) if
                               any(i.encode() in m for i in not_run)],
                    "unacked": [k for k, v in master.hgetall("unacked").items() if
                                any(i.encode() in v for i in not_run)],
                }  # fmt: skip
                log = ran.splitlines()[-40:]
                raise AssertionError(f"tasks never ran: {not_run}; on the new master: {where}; "
                                     "worker log:\n" + "\n".join(log))  # fmt: skip
            assert len(missing) <= 2, f"results lost with the master: {missing}"
            assert all(done[s.id] == f"a{i}" for i, s in enumerate(sent) if s.id in done), (
                "each result is its own task's"
            )
            assert not failures, "no task was ever stored as FAILURE"
            assert group.master_port() == new != old, "the sentinels promoted the replica"
            # The breaker's state came over with the replica, and goes on there.
            breakers = {b.name: b for b in list_breakers(shared)}
            assert breakers["inventory"].window_calls >= 1
            assert app.send_task("inventory.reserve", args=["after", 1]).get(timeout=30)
        finally:
            # The acknowledgement of a task running as the master died is lost with it
            # (Celery logs that as critical); the task runs again: nothing else may be.
            problems = worker.stop_and_check(expected=("Couldn't ack",))
        assert not problems, "\n".join(problems)
    finally:
        group.stop()
