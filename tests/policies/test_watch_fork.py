"""A process forked while the change feed's thread holds its lock (or runs a callback)
does not inherit that lock held: its first `watch()` returns. The prefork pool forks
new processes while the worker's feed thread runs (autoscaling, a replaced process)."""

from __future__ import annotations

import os
import threading
import time

import redis

from policies.watch import ChangeFeed


def fork_and_watch(feed: ChangeFeed, deadline: float = 10.0) -> int | None:
    """Fork; the child watches a channel and exits 0. The child's exit code, or None if
    it did not exit within `deadline` seconds (it was then killed)."""
    pid = os.fork()
    if pid == 0:  # the child: one thread, the locks as the fork left them
        try:
            feed.watch("bulwark:test:fork", lambda payload: None)
        finally:
            os._exit(0)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


def test_a_fork_while_another_thread_holds_the_feed_lock(r: redis.Redis) -> None:
    feed = ChangeFeed(r)
    held, release = threading.Event(), threading.Event()

    def hold(lock: threading.Lock) -> None:
        with lock:
            held.set()
            release.wait(0.5)  # the fork waits for it (at most this long)

    for lock in (feed._lock, feed._dispatching):  # the feed's own, and a callback running
        held.clear()
        release.clear()
        holder = threading.Thread(target=hold, args=(lock,))
        holder.start()
        held.wait(5)
        assert fork_and_watch(feed) == 0, "the child waited forever for an inherited lock"
        release.set()
        holder.join()
    feed.close()
