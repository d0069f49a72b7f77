"""Two real beats: one leads; SIGKILL it and the other sends the next health check within
30 s; no schedule slot is ever sent twice (counted from the messages in the queue)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from celery.beat import ScheduleEntry
from celery.schedules import schedule

from policies.leader import Leadership
from tests.kit import poll, start_beat, stop_session
from workers.app import app
from workers.beat import SLOT_HEADER, LeaderScheduler

pytestmark = pytest.mark.integration

FAST = {"BULWARK_HEALTH_CHECK_INTERVAL": "1", "BULWARK_BEAT_LOCK_TTL": "3"}


@pytest.fixture
def beats(redis_url: str, tmp_path: Path) -> Iterator[dict[int, subprocess.Popen[bytes]]]:
    started = [start_beat(redis_url, tmp_path, name, FAST) for name in ("one", "two")]
    yield {p.pid: p for p in started}
    for process in started:
        stop_session(process)


def sent_slots(r: redis.Redis) -> Counter[str]:
    """How often each `<entry>:<slot>` was sent, from the messages waiting in `default`."""
    found: Counter[str] = Counter()
    for raw in r.lrange("default", 0, -1):
        headers = json.loads(raw)["headers"]
        if SLOT_HEADER in headers:
            found[headers[SLOT_HEADER]] += 1
    return found


def checks(slots: Counter[str]) -> list[int]:
    return sorted(int(s.rsplit(":", 1)[1]) for s in slots if s.startswith("health-check:"))


def test_the_standby_takes_over_and_no_slot_is_sent_twice(
    r: redis.Redis, beats: dict[int, subprocess.Popen[bytes]]
) -> None:
    lock = Leadership(r, "beat", "test", ttl=3)
    leader = poll(lock.leader, deadline=30, what="a leading beat")
    poll(lambda: len(checks(sent_slots(r))) >= 3, deadline=30, what="health checks sent")
    holder_pid = int(leader[0].rsplit(":", 1)[1])
    assert holder_pid in beats, leader
    os.killpg(holder_pid, signal.SIGKILL)
    beats[holder_pid].wait()
    killed_at = time.time()
    sent_before = max(checks(sent_slots(r)))

    new = poll(lambda: (found := lock.leader()) and found[0] != leader[0] and found,
               deadline=30, what="the standby leading")  # fmt: skip
    assert new[1] > leader[1], "a larger fencing token"
    poll(lambda: max(checks(sent_slots(r))) > sent_before + 1, deadline=30,
         what="health checks sent by the new leader")  # fmt: skip
    assert time.time() - killed_at < 30

    slots = sent_slots(r)
    assert slots and max(slots.values()) == 1, [s for s, n in slots.items() if n > 1]


def test_a_new_leader_does_not_resend_what_its_predecessor_just_sent(r: redis.Redis) -> None:
    """The standby's own schedule did not move while it stood by: an hourly job it thinks
    overdue may have gone out seconds ago (the other side of a slot boundary)."""
    lead = Leadership(r, "beat", "host:1", ttl=5)
    token = lead.hold()
    assert token is not None
    standby = SimpleNamespace(_leadership=lead)
    hourly = schedule(timedelta(hours=1), app=app)
    stale = ScheduleEntry(name="hourly", task="bulwark.ping", schedule=hourly, app=app,
                          last_run_at=datetime.now(UTC) - timedelta(hours=2))  # fmt: skip
    assert not LeaderScheduler._sent_by_another(standby, stale), "never sent: due"
    lead.claim(token, "hourly", 1, now=time.time() - 5)  # sent 5 s ago, in the last slot
    assert LeaderScheduler._sent_by_another(standby, stale)
    lead.claim(token, "hourly", 2, now=time.time() - 7200)  # long ago: due again
    assert not LeaderScheduler._sent_by_another(standby, stale)
