"""Replay records: first delivery, redelivery (never acknowledged), replay (acknowledged),
the same through the Lua step (Redis 6) and the native SET NX GET (Redis 7)."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from policies.replay import Replays, keep_for, key, state


@pytest.mark.parametrize("native", [False, True], ids=["lua", "set-nx-get"])
def test_first_redelivered_replayed(r: redis.Redis, native: bool) -> None:
    replays = Replays(r, native=native)
    jti, exp = uuid.uuid4().hex, time.time() + 120

    def seen() -> str:
        pipe = r.pipeline()  # kombu's pipelines are MULTI/EXEC: the same here
        handle = replays.queue_seen(pipe, jti, exp)
        return state(handle.reply(pipe.execute(raise_on_error=False)))

    assert seen() == "first"
    assert seen() == "redelivered", "delivered, never acknowledged: it may run again"
    pipe = r.pipeline()
    Replays.queue_done(pipe, jti)
    pipe.execute()
    assert seen() == "replayed"
    assert 120 < r.ttl(key(jti)) <= 180, "kept until the message expires, and a minute"


def test_keep_for_is_bounded() -> None:
    assert keep_for(0, now=1000) == 60, "an expired message: a minute"
    assert keep_for(10**12, now=0) == 8 * 24 * 3600


def test_native_is_chosen_by_trying_it(r: redis.Redis) -> None:
    major = int(str(r.info("server")["redis_version"]).split(".")[0])
    assert Replays(r).native() is (major >= 7)


def test_native_is_found_under_an_acl_that_refuses_info(r: redis.Redis, redis_url: str) -> None:
    r.acl_setuser("noinfo", enabled=True, passwords=["+pw"], keys=["*"],
                  commands=["+@all", "-info"])  # fmt: skip
    limited = redis.Redis.from_url(redis_url, username="noinfo", password="pw")
    try:
        with pytest.raises(redis.ResponseError):
            limited.info()
        major = int(str(r.info("server")["redis_version"]).split(".")[0])
        assert Replays(limited).native() is (major >= 7)
    finally:
        limited.close()
        r.acl_deluser("noinfo")
