"""RabbitMQ as the broker, seen from Bulwark: queue depths from the broker's own counts.

On a Redis broker the fleet snapshot reads kombu's lists and its `unacked` hash.
On RabbitMQ, `AmqpBroker.queue_states` asks the broker itself: a passive
`queue.declare` per queue answers with its ready messages and consumers, in one
channel, over one connection kept per process. Messages a worker holds
unacknowledged are not in that count (only RabbitMQ's management API has them),
so `unacked` and `scheduled` stay 0; with native delayed delivery a countdown
waits in RabbitMQ's delay queues, not in a worker, so it is not in `ready` either.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from amqp.exceptions import AMQPError, NotFound
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError

__all__ = [
    "BROKER_ERRORS",
    "DEAD_EXCHANGE",
    "DEAD_QUEUE",
    "AmqpBroker",
    "declare_dead_letters",
    "whole_seconds",
]

#: What reaching RabbitMQ may raise (a Redis broker raises `redis.RedisError`).
BROKER_ERRORS = (OSError, OperationalError, AMQPError)

#: Where RabbitMQ dead-letters a message (delivery limit reached, rejected): a fanout
#: exchange into one quorum queue, never consumed as tasks (`bulwark status` counts it).
DEAD_EXCHANGE = Exchange("bulwark.dlx", type="fanout", durable=True)
DEAD_QUEUE = Queue(
    "bulwark.dead", DEAD_EXCHANGE, routing_key="", queue_arguments={"x-queue-type": "quorum"}
)


def declare_dead_letters(connection: Connection) -> None:
    """Declare `bulwark.dlx` and `bulwark.dead` (idempotent): every queue names the
    exchange as its dead-letter exchange, and RabbitMQ drops what it cannot route."""
    with connection.channel() as channel:
        DEAD_QUEUE.bind(channel).declare()


class AmqpBroker:
    """A RabbitMQ broker's queue counts and health, over one lazy connection."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.url = url
        self.timeout = timeout
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    def _channel(self) -> Any:
        if self._connection is None:
            self._connection = Connection(self.url, connect_timeout=self.timeout)
        self._connection.ensure_connection(max_retries=1, timeout=self.timeout)
        return self._connection.channel()

    def ping(self) -> bool:
        """True once the broker accepted a connection and a channel (raises if not)."""
        with self._lock:
            self._channel().close()
        return True

    def depths(self, names: Iterable[str]) -> dict[str, tuple[int, int]]:
        """(ready messages, consumers) per queue; a queue that does not exist yet is (0, 0)."""
        found: dict[str, tuple[int, int]] = {}
        with self._lock:
            channel = self._channel()
            try:
                for name in names:
                    try:
                        _name, ready, consumers = channel.queue_declare(name, passive=True)
                    except NotFound:  # the broker closed the channel: open another
                        found[name] = (0, 0)
                        channel = self._channel()
                        continue
                    found[name] = (int(ready), int(consumers))
            finally:
                channel.close()
        return found

    def dead(self) -> int:
        """Messages RabbitMQ dead-lettered into `bulwark.dead` (delivery limit, rejected)."""
        return self.depths([DEAD_QUEUE.name])[DEAD_QUEUE.name][0]

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.release()
                self._connection = None


def whole_seconds(countdown: float | None, eta: Any) -> tuple[float | None, Any]:
    """(countdown, eta) for a send through native delayed delivery (quorum queues): a delay
    under a second becomes one second.

    RabbitMQ's delay exchanges count whole seconds, and Celery truncates the delay to
    one: under a second it raises `ValueError: countdown must be a positive number` (a
    retry 100 ms later failed the task). A delay of 1.5 s is still held for 1 s.
    """
    ahead = countdown
    if eta is not None:
        due = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
        if not isinstance(due, datetime):
            return countdown, eta  # Celery says what is wrong with it
        due = due if due.tzinfo is not None else due.replace(tzinfo=UTC)
        ahead = (due - datetime.now(UTC)).total_seconds()
    if ahead is not None and 0 < ahead < 1:
        return 1.0, None
    return countdown, eta
