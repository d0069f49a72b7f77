"""The resource pool: bounds under 32 threads, checks on checkout, retirement, clear errors.
Resources here are real sockets to a real redis-server where a connection matters."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import pytest
import redis

from policies.errors import PolicyConfigError
from policies.pool import PoolError, PoolExhausted, ResourcePool


def redis_socket(r: redis.Redis) -> socket.socket:
    kwargs = r.connection_pool.connection_kwargs
    return socket.create_connection((kwargs["host"], kwargs["port"]), timeout=2)


def alive(sock: socket.socket) -> bool:
    """A PING on the socket answers +PONG."""
    sock.sendall(b"PING\r\n")
    return sock.recv(16) == b"+PONG\r\n"


def test_never_more_than_max_size_out_with_32_threads(r: redis.Redis) -> None:
    counts: Counter[str] = Counter()
    levels: list[tuple[int, int]] = []
    pool = ResourcePool("redis-sockets", lambda: redis_socket(r), max_size=4, check=alive,
                        close=socket.socket.close, on_level=lambda *lv: levels.append(lv),
                        on_count=lambda k, v: counts.update({k: 1}))  # fmt: skip
    peak, lock, errors = [0], threading.Lock(), []

    def work() -> None:
        for _ in range(20):
            try:
                with pool.checkout() as out:
                    with lock:
                        peak[0] = max(peak[0], pool.in_use)
                    assert alive(out.resource)
            except Exception as exc:  # collected: an assert in a thread would be lost
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and peak[0] <= 4
    assert counts["created"] <= 4 and pool.in_use == 0 and pool.idle == counts["created"]
    assert max(in_use for in_use, _ in levels) <= 4 and levels[-1] == (0, pool.idle)
    pool.close()


def test_a_broken_connection_is_replaced_on_checkout(r: redis.Redis) -> None:
    pool = ResourcePool("redis-sockets", lambda: redis_socket(r), max_size=1, check=alive,
                        close=socket.socket.close)  # fmt: skip
    with pool.checkout() as out:
        first = out.resource
        first.sendall(b"CLIENT ID\r\n")
        client_id = int(first.recv(32).strip()[1:])
    r.client_kill_filter(_id=client_id)  # the server drops the idle socket
    with pool.checkout() as out:
        assert out.resource is not first and alive(out.resource)
    pool.close()


def test_a_resource_reported_broken_is_not_reused() -> None:
    made: list[object] = []
    pool = ResourcePool("things", lambda: made.append(object()) or made[-1], max_size=2,
                        broken_on=(ConnectionError,))  # fmt: skip
    with pytest.raises(ConnectionError), pool.checkout():
        raise ConnectionError("reset by peer")
    with pool.checkout() as out:
        out.broken()
    with pool.checkout():
        pass
    assert len(made) == 3 and pool.idle == 1


def test_idle_and_old_resources_are_retired() -> None:
    now = [0.0]
    made: list[int] = []
    pool = ResourcePool("clock", lambda: made.append(len(made)) or len(made), max_size=1,
                        idle_timeout=10, max_lifetime=100, clock=lambda: now[0])  # fmt: skip
    with pool.checkout():
        pass
    now[0] = 5.0
    with pool.checkout():  # idle 5 s: reused
        pass
    now[0] = 20.0
    with pool.checkout():  # idle 15 s: retired, a new one
        pass
    for _ in range(12):  # used every 9 s: never idle long, but 100 s old at last
        now[0] += 9
        with pool.checkout():
            pass
    assert made == [0, 1, 2]


def test_exhaustion_and_a_failing_factory_say_what_happened() -> None:
    pool = ResourcePool("slow", object, max_size=1, checkout_timeout=0.1)
    with pool.checkout():
        started = time.monotonic()
        with (
            pytest.raises(PoolExhausted, match=r"pool slow: no resource free within 0\.1 s"),
            pool.checkout(),
        ):
            pass
        assert time.monotonic() - started < 2
    failing = ResourcePool("down", lambda: 1 / 0, max_size=1)
    for _ in range(3):  # a failed make gives its slot back
        with (
            pytest.raises(PoolError, match="pool down: could not make a resource"),
            failing.checkout(),
        ):
            pass
    assert failing.in_use == 0
    with pytest.raises(PolicyConfigError, match="max_size"):
        ResourcePool("bad", object, max_size=0)
    with pytest.raises(PolicyConfigError, match="checkout_timeout"):
        ResourcePool("bad", object, max_size=1, checkout_timeout=0)
