"""One leader per role with fencing tokens; each job's run claimed once per slot (real Redis)."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from policies.errors import PolicyConfigError
from policies.leader import CLAIMED, DEPOSED, RAN_ALREADY, Leadership, slot_of
from tests.kit import poll


def test_one_leader_and_a_larger_token_for_the_next(r: redis.Redis) -> None:
    a = Leadership(r, "beat", "host:1", ttl=0.3)
    b = Leadership(r, "beat", "host:2", ttl=0.3)
    first = a.hold()
    assert first is not None and b.hold() is None
    assert a.hold() == first, "renewing keeps the token"
    assert a.leader() == ("host:1", first)
    second = poll(b.hold, deadline=5, what="b leads once a stops renewing")
    assert second > first
    assert a.hold() is None, "the old leader does not take the lock back"


def test_a_slot_is_claimed_once_and_never_by_a_deposed_leader(r: redis.Redis) -> None:
    a = Leadership(r, "beat", "host:1", ttl=0.3)
    b = Leadership(r, "beat", "host:2", ttl=0.3)
    old = a.hold()
    assert old is not None
    assert a.last_sent("health-check") is None
    assert a.claim(old, "health-check", 7, now=70.5) == CLAIMED
    assert a.claim(old, "health-check", 7, now=71.0) == RAN_ALREADY
    assert b.last_sent("health-check") == 70.5
    new = poll(b.hold, deadline=5, what="b leads")
    assert a.claim(old, "health-check", 8, now=80.0) == DEPOSED, "fenced off: a paused ex-leader"
    assert b.claim(new, "health-check", 7, now=79.0) == RAN_ALREADY, "its predecessor ran 7"
    assert b.claim(new, "health-check", 8, now=80.0) == CLAIMED
    assert b.last_sent("health-check") == 80.0


def test_release_lets_the_standby_take_over_at_once(r: redis.Redis) -> None:
    a = Leadership(r, "beat", "host:1", ttl=60)
    b = Leadership(r, "beat", "host:2", ttl=60)
    assert a.hold() is not None and b.hold() is None
    assert not b.release()  # not its lock: nothing happens
    assert b.hold() is None
    assert a.release()
    assert b.hold() is not None
    assert not a.release(), "a lock taken over meanwhile is never deleted by the old holder"
    assert b.leader() is not None


def test_bad_inputs_name_the_problem(r: redis.Redis) -> None:
    with pytest.raises(PolicyConfigError, match="ttl"):
        Leadership(r, "beat", "h:1", ttl=float("nan"))
    lead = Leadership(r, "beat", "h:1", ttl=5)
    token = lead.hold()
    assert token is not None
    with pytest.raises(ValueError, match="field"):
        lead.claim(token, "a job {with} braces", 1, now=1.0)


@given(st.floats(0, 4e9), st.one_of(st.floats(-10, 1e6), st.just(float("nan"))))
def test_slots_are_consecutive_and_at_least_a_second_wide(now: float, every: float) -> None:
    slot = slot_of(now, every)
    width = every if every == every and every >= 1 else 1.0
    assert slot * width <= now < (slot + 1) * width + 1e-6 * max(1.0, now)
