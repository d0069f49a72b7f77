"""Celery's prefork pool, without its 30-second stall on a warm shutdown.

When the worker stops consuming (a warm shutdown, or a lost broker connection) the
pool's `flush` drops every job a pool process has not acknowledged yet, "since the
broker will redeliver it". A job already written to a process's pipe is not the
broker's any more: the process reads it, runs it and reports it done. Dropped from
the pool's cache, nothing reads that report: the process waits up to 30 s for it to be
consumed (billiard's `_ensure_messages_consumed`) before it exits, the warm shutdown
waits for the process, and a supervisor's stop timeout (honcho's 5 s, Kubernetes' 30 s)
kills the worker mid-stop. The job also finishes unseen: its result is stored, but the
message it came in is never acknowledged here.

`TaskPool` keeps those jobs: `flush` still drops the ones no process has been handed,
and the shutdown then reads the reports of the others like any running job's.

Its processes also exit as soon as they have reported their exit. billiard's sleep a
second first, for the parent to read the report and SIGTERM them; during a warm
shutdown nothing reads it, so every stop (and every shrink of the pool) took a second
longer. The report stays in the pipe for the parent to read after the exit, and the
process's pid cannot be reused before the parent has reaped it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from billiard.common import TERM_SIGNAL
from billiard.pool import DEATH, EX_FAILURE, EX_OK, SIG_SOFT_TIMEOUT
from celery.concurrency.asynpool import AsynPool
from celery.concurrency.asynpool import Worker as AsynWorker
from celery.concurrency.prefork import TaskPool as PreforkTaskPool


class PoolProcess(AsynWorker):  # type: ignore[misc]
    """A pool process that exits once it has reported its exit, without a second's sleep,
    and that a soft time limit does not interrupt while it waits, leaving, for the parent
    to read its last reports."""

    def _ensure_messages_consumed(self, completed: int) -> bool:
        # Every job of this process is done and reported here. A soft time limit signalled
        # now is for one of them (the parent has not read its report yet): nothing to stop.
        # billiard's handler would raise inside this wait, and the process end in a
        # traceback printed as plain text instead of its log lines.
        if SIG_SOFT_TIMEOUT is None:
            return bool(super()._ensure_messages_consumed(completed))
        previous = signal.signal(SIG_SOFT_TIMEOUT, signal.SIG_IGN)
        try:
            return bool(super()._ensure_messages_consumed(completed))
        finally:
            signal.signal(SIG_SOFT_TIMEOUT, previous)

    def _do_exit(self, pid: int, exitcode: int | None, exc: BaseException | None = None) -> None:
        if exitcode is None:
            exitcode = EX_FAILURE if exc else EX_OK
        if self.on_exit is not None:
            self.on_exit(pid, exitcode)
        try:
            # As billiard does: a TERM arriving mid-put would leave the queue locked.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {TERM_SIGNAL})
            try:
                self.outq.put((DEATH, (pid, exitcode)))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        finally:
            os._exit(exitcode)


class HandedJobsPool(AsynPool):  # type: ignore[misc]
    """An `AsynPool` whose `flush` keeps the jobs a process was handed, and whose
    processes exit without sleeping."""

    Worker = PoolProcess

    def flush(self) -> None:
        cache: dict[Any, Any] = self._cache
        handed = {
            key: job
            for key, job in cache.items()
            if not self.synack and not job._accepted and job._write_to is not None
        }
        super().flush()
        for key, job in handed.items():
            cache.setdefault(key, job)


class TaskPool(PreforkTaskPool):  # type: ignore[misc]
    """Celery's prefork `TaskPool` (`worker_pool`) on `HandedJobsPool`."""

    Pool = HandedJobsPool
