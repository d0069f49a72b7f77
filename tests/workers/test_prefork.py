"""A warm shutdown right after a job was handed to a pool process: the worker stops at
once, and the job is run and acknowledged (Celery's own pool waits 30 s for a process
whose report nobody reads, and leaves the message unacknowledged)."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
import struct
import termios
import threading
import time
from pathlib import Path

import pytest
import redis
from billiard.pool import SIG_SOFT_TIMEOUT, soft_timeout_sighandler

from tests.conftest import StartWorker
from tests.kit import poll
from workers.client import client
from workers.prefork import PoolProcess

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


def test_a_soft_time_limit_does_not_interrupt_a_leaving_process() -> None:
    """Seen in `bulwark up`'s stop: the parent's soft time limit of a job the process had
    finished (its report not yet read) reached the process as it waited, leaving, for the
    parent to read its reports; billiard's handler raised there, and the process printed a
    plain-text traceback. Now the wait ignores it, and the handler is back after."""
    process = PoolProcess.__new__(PoolProcess)
    counter = multiprocessing.Value("i", 0)
    process.on_ready_counter = counter

    def signal_then_read() -> None:
        os.kill(os.getpid(), SIG_SOFT_TIMEOUT)  # the parent's soft time limit
        counter.value = 1  # the parent reads the report

    previous = signal.signal(SIG_SOFT_TIMEOUT, soft_timeout_sighandler)
    try:
        reader = threading.Timer(0.05, signal_then_read)
        reader.start()
        assert process._ensure_messages_consumed(completed=1) is True
        reader.join()
        assert signal.getsignal(SIG_SOFT_TIMEOUT) is soft_timeout_sighandler
    finally:
        signal.signal(SIG_SOFT_TIMEOUT, previous)
