"""A Redis connection pool without redis-py's per-command checkout costs.

redis-py 8's `ConnectionPool` does, for every command it hands a connection to: a
non-blocking peek at the socket (three system calls: is there unread data, or did the
server close it?) and four connection-count records for its OpenTelemetry metrics, which
Bulwark does not export. On this machine that is 40 of a PING's 140 µs, and a task sends
several commands across the worker's processes.

`LeanConnectionPool` keeps what the peek was for: a connection that sat idle in the pool
for `PEEK_AFTER` seconds or more (a server that closed it, restarted, or failed over
meanwhile) is peeked at as before, and reconnected if it has data or is closed. One in
steady use is not: an error while sending or reading disconnects it (redis-py does that
for any exception, a time limit's included), so it comes back clean. Every client also
sets `health_check_interval`, and redis-py retries a command that met a dead socket.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

__all__ = ["PEEK_AFTER", "LeanConnectionPool", "execute_meanwhile"]

#: Seconds a pooled connection may sit idle before its socket is peeked at on checkout.
PEEK_AFTER = 1.0

_IDLE_SINCE = "_bulwark_idle_since"


class LeanConnectionPool(redis.ConnectionPool):
    """`redis.ConnectionPool` that peeks only at connections idle for `PEEK_AFTER` s."""

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self._checkpid()
        with self._lock:
            try:
                connection = self._available_connections.pop()
            except IndexError:
                connection = self.make_connection()
            self._in_use_connections.add(connection)
        try:
            connection.connect()
            idle_since = getattr(connection, _IDLE_SINCE, None)
            if idle_since is not None and time.monotonic() - idle_since >= PEEK_AFTER:
                try:
                    if connection.can_read():
                        raise redis.ConnectionError("Connection has data")
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    connection.disconnect()
                    connection.connect()
                    if connection.can_read():
                        raise redis.ConnectionError("Connection not ready") from None
        except BaseException:
            self.release(connection)
            raise
        return connection

    def release(self, connection: Any) -> None:
        self._checkpid()
        with self._lock:
            try:
                self._in_use_connections.remove(connection)
            except KeyError:
                return  # not ours (redis-py's pool says the same, silently)
            if not self.owns_connection(connection):
                connection.disconnect()  # made before a fork: the parent's socket
                if connection.pid == self.pid:
                    self._created_connections -= 1
                return
            reconnect = getattr(connection, "should_reconnect", None)  # redis-py 7+
            if reconnect is not None and reconnect():
                connection.disconnect()
            setattr(connection, _IDLE_SINCE, time.monotonic())
            self._available_connections.append(connection)


def execute_meanwhile(pipe: Any, meanwhile: Callable[[], None]) -> list[Any]:
    """`pipe.execute(raise_on_error=False)`, calling `meanwhile` once the commands are sent
    and before the first reply is read: work done while Redis runs them, instead of waiting
    for its answer. If the pipeline had nothing to send, `meanwhile` is called after; if
    the send failed, not at all (the error goes on as it came). If `meanwhile` raises (it
    should not; a `BaseException` such as a shutdown may), the connection, whose replies
    are then unread, is dropped instead of going back to the pool."""
    read = pipe.parse_response
    called = False

    def first_reply(connection: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal called
        vars(pipe).pop("parse_response", None)  # the other replies: read as usual
        if not called:
            called = True
            try:
                meanwhile()
            except BaseException:
                connection.disconnect()
                raise
        return read(connection, *args, **kwargs)

    pipe.parse_response = first_reply
    try:
        results: list[Any] = pipe.execute(raise_on_error=False)
    finally:
        vars(pipe).pop("parse_response", None)
    if not called:
        meanwhile()
    return results
