"""Acknowledgements made on the worker's event loop ride with the next delivery's record:
one round trip where kombu makes two. None waits longer than `ACK_WITHIN`, none is lost
when the channel closes, and one made on another thread (the threads pool) goes at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.asynchronous import Hub

from tests.kit import poll
from workers.transport import ACK_WITHIN, GuardedTransport

pytestmark = pytest.mark.integration


def _message(channel: Any, tag: str) -> Any:
    payload = {"body": "e30=", "headers": {"id": tag}, "content-type": "application/json",
               "content-encoding": "utf-8",
               "properties": {"delivery_tag": tag, "priority": 0, "body_encoding": "base64",
                              "delivery_info": {"exchange": "bulwark",
                                                "routing_key": "default"}}}  # fmt: skip
    return channel.Message(payload, channel=channel)


def _execs(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


@pytest.fixture
def on_loop(redis_url: str) -> Iterator[tuple[Any, Hub]]:
    """A channel of the guarded transport registered with a real kombu event loop."""
    hub = Hub()
    with Connection(redis_url, transport=GuardedTransport) as connection:
        channel = connection.channel()
        Queue("default", Exchange("bulwark", "direct"), routing_key="default")(channel).declare()
        connection.transport.register_with_event_loop(connection.connection, hub)
        yield channel, hub
    hub.close()


def _delivered(channel: Any, tag: str) -> Any:
    message = _message(channel, tag)
    channel.qos.append(message, tag)
    return message


def test_an_ack_rides_with_the_next_delivery(r: redis.Redis, on_loop: tuple[Any, Hub]) -> None:
    channel, _ = on_loop
    _delivered(channel, "t1")
    before = _execs(r)
    channel.qos.ack("t1")
    assert r.hkeys(channel.unacked_key) == [b"t1"]  # not sent yet
    _delivered(channel, "t2")
    assert r.hkeys(channel.unacked_key) == [b"t2"]  # t1's removal went with t2's record
    assert r.zrange(channel.unacked_index_key, 0, -1) == [b"t2"]
    assert _execs(r) - before == 1  # one transaction for both


def test_an_ack_waits_at_most_ack_within(r: redis.Redis, on_loop: tuple[Any, Hub]) -> None:
    channel, hub = on_loop
    _delivered(channel, "t1")
    channel.qos.ack("t1")
    acked = time.monotonic()
    assert r.hexists(channel.unacked_key, "t1")

    def sent() -> bool:
        hub.fire_timers(propagate=(Exception,))
        return not r.hexists(channel.unacked_key, "t1")

    assert poll(sent, deadline=5, every=0.001)
    assert r.zcard(channel.unacked_index_key) == 0
    assert time.monotonic() - acked >= ACK_WITHIN  # by the timer, not earlier


def test_closing_the_channel_sends_its_acks(r: redis.Redis, on_loop: tuple[Any, Hub]) -> None:
    channel, _ = on_loop
    _delivered(channel, "t1")
    _delivered(channel, "t2")
    channel.qos.ack("t1")
    channel.close()  # t2 is restored, as kombu does; t1 was acknowledged: gone
    assert r.hlen(channel.unacked_key) == 0
    assert r.zcard(channel.unacked_index_key) == 0
    (restored,) = r.lrange("default", 0, -1)
    assert b'"t2"' in restored


def test_an_ack_off_the_loop_goes_at_once(r: redis.Redis, on_loop: tuple[Any, Hub]) -> None:
    channel, _ = on_loop
    _delivered(channel, "t1")
    acking = threading.Thread(target=channel.qos.ack, args=("t1",))
    acking.start()
    acking.join(10)
    assert not r.hexists(channel.unacked_key, "t1")


def test_acks_refused_with_a_record_are_kept(r: redis.Redis, on_loop: tuple[Any, Hub]) -> None:
    """A full Redis (maxmemory, noeviction) refuses the next delivery's record: the acks
    that rode with it are kept, and go with the next one once Redis takes writes again."""
    channel, _ = on_loop
    _delivered(channel, "t1")
    channel.qos.ack("t1")
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")
    try:
        with pytest.raises(redis.ResponseError):
            _delivered(channel, "t2")
    finally:
        r.config_set("maxmemory", "0")
    assert r.hexists(channel.unacked_key, "t1")
    _delivered(channel, "t3")
    assert r.hkeys(channel.unacked_key) == [b"t3"]  # t1's removal went with t3's record
