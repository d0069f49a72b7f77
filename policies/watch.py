"""A change feed: one pub/sub subscriber thread per Redis client per process.

Policies cache shared state locally (a closed breaker, a degradation level) and
must drop that cache the moment another worker changes it. Each policy
instance publishes on its channel (`keys.channel(...)`) from inside the Lua
script that changed it; `ChangeFeed` delivers those messages to callbacks.

A cache may be trusted only while `feed.healthy` is true: when the subscriber
loses its connection every callback gets `None` ("you may have missed
something") and `healthy` stays false until it has re-subscribed.

The thread is started lazily, in the process that first calls `watch()`, so a
feed's thread is never inherited across fork. Its locks are kept consistent across
fork: the prefork pool forks new processes (autoscaling, a replaced process) while
this thread runs, and a child that inherited a lock the thread held at that instant
would wait for it forever in its first `watch()` (its task accepted and never run).
`os.register_at_fork` takes every feed's locks before a fork and gives them back on
both sides, so no fork happens while the thread holds one or runs a callback (which
takes the watching cache's lock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable

import redis

logger = logging.getLogger(__name__)

Callback = Callable[[bytes | None], None]


class ChangeFeed:
    """Delivers pub/sub messages of watched channels to callbacks, in a daemon thread."""

    def __init__(self, client: redis.Redis, *, reconnect_delay: float = 0.5) -> None:
        self._client = client
        self._callbacks: dict[str, list[Callback]] = defaultdict(list)
        self._lock = threading.Lock()
        #: Held while callbacks run (they take the caches' locks), and across a fork.
        self._dispatching = threading.Lock()
        self._pubsub: redis.client.PubSub | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._healthy = threading.Event()
        self._stop = threading.Event()
        self._reconnect_delay = reconnect_delay
        self._pending: set[str] = set()
        _all_feeds.add(self)

    def _hold_for_fork(self) -> None:
        self._dispatching.acquire()
        self._lock.acquire()

    def _release_after_fork(self) -> None:
        self._lock.release()
        self._dispatching.release()

    @property
    def healthy(self) -> bool:
        """True while subscribed and connected: cached state may be trusted."""
        return self._healthy.is_set() and self._pid == os.getpid()

    def wait_healthy(self, timeout: float) -> bool:
        return self._healthy.wait(timeout) and self._pid == os.getpid()

    def watch(self, channel: str, callback: Callback) -> None:
        """Call `callback(payload)` for each message on `channel`, `None` on a lost feed."""
        with self._lock:
            self._ensure_thread()
            self._callbacks[channel].append(callback)
            self._pending.add(channel)
            # Not healthy until the subscriber thread confirmed this channel.
            self._healthy.clear()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._healthy.clear()
        self._stop.clear()
        self._pubsub = None
        self._pending = set(self._callbacks)
        self._thread = threading.Thread(target=self._run, name="bulwark-change-feed", daemon=True)
        self._thread.start()

    def _reset_all(self) -> None:
        self._healthy.clear()
        with self._dispatching:
            for callbacks in list(self._callbacks.values()):
                for callback in list(callbacks):
                    _safe(callback, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._serve()
            except Exception as exc:
                # Whatever broke (a lost connection, a pool closed under the thread),
                # the feed says so, drops every cache and connects again: it never dies.
                if self._healthy.is_set():
                    logger.warning("change feed lost its connection: %s", exc)
                self._reset_all()
                if self._pubsub is not None:
                    with contextlib.suppress(Exception):
                        self._pubsub.close()
                self._pubsub = None
                with self._lock:
                    self._pending = set(self._callbacks)
                self._stop.wait(self._reconnect_delay)

    def _serve(self) -> None:
        pubsub = self._pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        unconfirmed: set[str] = set()
        deadline = 0.0
        while not self._stop.is_set():
            with self._lock:
                pending, self._pending = self._pending, set()
            if pending:
                pubsub.subscribe(*pending)
                unconfirmed |= pending
                deadline = time.monotonic() + 5.0
            message = pubsub.get_message(timeout=0.2)
            if message is not None:
                channel = _text(message["channel"])
                if message["type"] == "subscribe":
                    unconfirmed.discard(channel)
                elif message["type"] == "message":
                    with self._dispatching:
                        for callback in list(self._callbacks.get(channel, ())):
                            _safe(callback, message["data"])
            if unconfirmed and time.monotonic() > deadline:
                raise redis.ConnectionError("Redis did not confirm the subscription")
            with self._lock:
                if not unconfirmed and not self._pending and pubsub.subscribed:
                    self._healthy.set()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _safe(callback: Callback, payload: bytes | None) -> None:
    try:
        callback(payload)
    except Exception:
        logger.exception("change feed callback %r failed", callback)


_feeds: weakref.WeakKeyDictionary[redis.Redis, ChangeFeed] = weakref.WeakKeyDictionary()
_feeds_lock = threading.Lock()
#: Every feed of this process, for the fork handlers.
_all_feeds: weakref.WeakSet[ChangeFeed] = weakref.WeakSet()
_held: list[ChangeFeed] = []


def _before_fork() -> None:
    _feeds_lock.acquire()
    _held[:] = list(_all_feeds)
    for feed in _held:
        feed._hold_for_fork()


def _after_fork() -> None:
    for feed in reversed(_held):
        feed._release_after_fork()
    _held.clear()
    _feeds_lock.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)


def feed_for(client: redis.Redis) -> ChangeFeed:
    """The change feed of `client` in this process (one subscriber thread per client)."""
    with _feeds_lock:
        feed = _feeds.get(client)
        if feed is None:
            feed = _feeds[client] = ChangeFeed(client)
        return feed
