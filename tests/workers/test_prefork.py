"""A warm shutdown right after a job was handed to a pool process: the worker stops at
once, and the job is run and acknowledged (Celery's own pool waits 30 s for a process
whose report nobody reads, and leaves the message unacknowledged)."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import termios
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import StartWorker
from tests.kit import poll
from workers.client import client

pytestmark = pytest.mark.integration


def unread_in_pipes(pid: int) -> int:
    """Bytes waiting in the pipes process `pid` holds open (its pool inqueue among them),
    read through /proc (opening /proc/PID/fd/N opens that same pipe)."""
    waiting = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if not os.readlink(fd).startswith("pipe:"):
                continue
            own = os.open(fd, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            waiting += struct.unpack("i", fcntl.ioctl(own, termios.FIONREAD, b"\0" * 4))[0]
        finally:
            os.close(own)
    return waiting


def test_a_warm_shutdown_waits_for_a_handed_job_and_no_longer(
    r: redis.Redis, start_worker: StartWorker
) -> None:
    worker = start_worker(
        ["inventory"], name="handed", concurrency=1, env={"BULWARK_LOG_LEVEL": "debug"}
    )
    assert worker.process is not None
    app = client()
    # One job first, done and acknowledged: the pool process is up and idle.
    assert app.send_task("inventory.reserve", args=["first", 1]).get(timeout=30)
    poll(lambda: r.hlen("unacked") == 0, what="the first job acknowledged")
    (child,) = (
        Path(f"/proc/{worker.process.pid}/task/{worker.process.pid}/children").read_text().split()
    )
    os.kill(int(child), signal.SIGSTOP)  # it cannot take the job, nor acknowledge it
    try:
        result = app.send_task("inventory.reserve", args=["handed", 1])
        # Written to the stopped process's pipe: handed over, not acknowledged.
        poll(lambda: unread_in_pipes(int(child)) > 0, what="the job written to the pool process")
        os.kill(worker.process.pid, signal.SIGTERM)
        poll(lambda: b"Stopping Pool" in worker.log.read_bytes(), what="the pool stopping")
    finally:
        os.kill(int(child), signal.SIGCONT)
    started = time.monotonic()
    assert worker.process.wait(timeout=20) == 0
    assert time.monotonic() - started < 10, "stopped without waiting for an unread report"
    assert result.get(timeout=5) == {"sku": "handed", "reserved": 1}
    # Its message was acknowledged: nothing back on the queue, nothing held unacked.
    assert r.llen("inventory") == 0
    assert r.hlen("unacked") == 0
