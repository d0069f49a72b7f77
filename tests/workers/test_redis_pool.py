"""`LeanConnectionPool`: no socket peek per command, and still no stale connection handed out
after it sat idle while the server closed it."""

from __future__ import annotations

import os
from typing import Any

import pytest
import redis

from tests.kit import poll
from workers import redis_pool
from workers.redis_pool import LeanConnectionPool, execute_meanwhile
from workers.stores import connect

pytestmark = pytest.mark.integration


def _peeks(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every `can_read` the pool's connection class makes, noted."""
    seen: list[Any] = []
    cls = client.connection_pool.connection_class
    original = cls.can_read

    def noted(self: Any, *args: Any, **kwargs: Any) -> bool:
        seen.append(self)
        return bool(original(self, *args, **kwargs))

    monkeypatch.setattr(cls, "can_read", noted)
    return seen


def test_clients_use_the_lean_pool(redis_url: str) -> None:
    client = connect(redis_url, socket_timeout=2.0)
    assert isinstance(client.connection_pool, LeanConnectionPool)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 2.0
    assert client.ping()
    client.close()


def test_a_connection_in_steady_use_is_not_peeked_at(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect(redis_url)
    client.ping()
    peeks = _peeks(client, monkeypatch)
    for i in range(50):
        client.set("k", i)
        with client.pipeline() as pipe:
            pipe.get("k").incr("n").execute()
    pool = client.connection_pool
    ours = {*pool._available_connections, *pool._in_use_connections}
    # The class is patched: other threads of this test process (change feeds of earlier
    # tests) peek on their own connections, which are not this pool's.
    assert [c for c in peeks if c in ours] == []
    assert len(pool._available_connections) == 1  # one, reused
    client.close()


def test_an_idle_connection_the_server_closed_is_replaced(
    r: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect(redis_url, retry=None)  # no retry to hide a stale connection
    first = client.client_id()
    monkeypatch.setattr(redis_pool, "PEEK_AFTER", 0.0)  # idle long enough, at once
    peeks = _peeks(client, monkeypatch)
    r.client_kill_filter(_id=first)
    assert client.client_id() != first  # a new connection, no error
    assert peeks  # found by the peek
    client.close()


def test_a_forked_child_does_not_reuse_its_parents_connection(redis_url: str) -> None:
    client = connect(redis_url)
    parent = client.client_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, str(client.client_id()).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = int(os.read(read, 64))
    os.waitpid(pid, 0)
    assert child != parent
    assert client.client_id() == parent  # the parent's connection still works
    client.close()


def test_meanwhile_runs_once_the_commands_are_sent(r: redis.Redis, redis_url: str) -> None:
    client = connect(redis_url)
    seen: list[bool] = []

    def meanwhile() -> None:  # the commands are at the server: another connection sees them
        seen.append(bool(poll(lambda: r.get("meanwhile") == b"2", deadline=5, every=0.001)))

    with client.pipeline() as pipe:
        pipe.set("meanwhile", 1).incr("meanwhile")
        assert execute_meanwhile(pipe, meanwhile) == [True, 2]
    assert seen == [True]
    client.close()


def test_a_failed_send_does_not_call_meanwhile() -> None:
    client = connect("redis://127.0.0.1:1/0", retry=None, socket_connect_timeout=1)
    calls: list[int] = []
    with client.pipeline() as pipe, pytest.raises(redis.ConnectionError):
        pipe.set("k", 1)
        execute_meanwhile(pipe, lambda: calls.append(1))
    assert calls == []  # the error goes on as it came


def test_a_meanwhile_that_raises_leaves_no_unread_reply_behind(redis_url: str) -> None:
    """A shutdown (a BaseException) in `meanwhile`: the connection, whose replies were not
    read, is dropped; the next command on the client reads its own reply."""
    client = connect(redis_url)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with client.pipeline() as pipe, pytest.raises(KeyboardInterrupt):
        pipe.set("stale", "first").get("stale")
        execute_meanwhile(pipe, interrupted)
    client.set("fresh", "second")
    assert client.get("fresh") == b"second"
    client.close()
