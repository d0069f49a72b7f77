"""`AuditLog`: one process's writer. Records are made at once, written in batches.

`record()` only links the record into this writer's chain and queues it for
each sink: no I/O, so it is cheap on a task's hot path. The records reach the
sinks in batches, by one of:

- `flush()`: every pending record, one pipelined round trip to Redis and one
  write to the file;
- `queue_flush(pipe)`: the pending XADDs ride a pipeline the caller sends
  anyway (then `settle()` the handle with that pipeline's replies);
- the flusher thread (`start(interval)`, `stop()`), which calls `flush()`.

A sink that fails never raises into the caller: its records stay pending (at
most `max_pending` per sink, then the oldest are dropped and counted, which
the verifier will then report as deleted), a warning is logged once per
outage, and the sink is tried again at most every `retry_interval` seconds.
Each sink has at most one batch in flight, so a retried batch never lands
after a later one.

Build it after the process forks (its writer id names the process, and the
flusher thread does not survive a fork).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.audit.chain import Chain
from policies.audit.files import FileSink
from policies.audit.record import AuditRecord, utc_stamp
from policies.audit.stream import AUDIT_STREAM, DEFAULT_MAXLEN, StreamSink
from policies.clock import Clock

__all__ = ["AuditConfig", "AuditLog", "QueuedFlush", "writer_id"]

logger = logging.getLogger(__name__)

#: What a failing sink looks like: Redis errors, and the file system's.
SINK_ERRORS = (redis.RedisError, OSError)


def writer_id(role: str = "") -> str:
    """`[role:]host:pid:nonce`. The nonce keeps a restarted process with a reused pid
    from continuing, or colliding with, the chain of the process before it."""
    prefix = f"{role}:" if role else ""
    return f"{prefix}{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditConfig:
    """How often to sign, how much to keep while a sink is down, where the stream is."""

    #: A signed checkpoint after this many records...
    checkpoint_every: int = 100
    #: ...or after this many seconds with unsigned records (checked on record and flush).
    checkpoint_interval: float = 10.0
    #: Records kept per sink while it fails; past it the oldest are dropped (and counted).
    max_pending: int = 100_000
    #: While a sink fails, it is tried again at most this often (seconds).
    retry_interval: float = 1.0
    #: A batch queued by `queue_flush` and not settled within this many seconds is sent
    #: again (a repeat the verifier recognises), so a lost handle cannot stall the sink.
    stale_after: float = 30.0
    stream: str = AUDIT_STREAM
    maxlen: int = DEFAULT_MAXLEN

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "max_pending", "maxlen"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("checkpoint_interval", "retry_interval", "stale_after"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")


Sink = StreamSink | FileSink


class _Outbox:
    """The records one sink has yet to take, its batch in flight, and its outage."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.pending: deque[AuditRecord] = deque()
        self.in_flight: list[AuditRecord] | None = None
        self.flight = 0
        self.sent_at = 0.0
        self.dropped = 0
        self.down = False
        self.next_try = 0.0


@dataclass(frozen=True, slots=True)
class _Batch:
    box: _Outbox
    flight: int
    records: list[AuditRecord]
    #: Where its replies are in the caller's pipeline (queue_flush only).
    index: int = 0
    count: int = 0


class QueuedFlush:
    """The audit commands `AuditLog.queue_flush` put on a pipeline.

    Call `settle()` with that pipeline's `execute(raise_on_error=False)` result,
    or with the error `execute` raised: records Redis took are done, the others
    pending again.
    """

    def __init__(self, log: AuditLog, batches: Sequence[_Batch]) -> None:
        self._log = log
        self._batches = batches

    def settle(self, results: Sequence[Any] | BaseException) -> bool:
        """True if every queued record was written."""
        ok = True
        for batch in self._batches:
            replies = (
                results
                if isinstance(results, BaseException)
                else results[batch.index : batch.index + batch.count]
            )
            try:
                StreamSink.check(replies)
            except SINK_ERRORS as exc:
                self._log._failed(batch, exc)
                ok = False
            else:
                self._log._done(batch)
        return ok


class AuditLog:
    """This process's audit writer: one hash chain, checkpoints signed with `signing_key`.

    `client` (the Redis stream) and `directory` (one JSON-lines file per writer)
    are the sinks; give either or both. `now` gives record times (UTC), `clock`
    the monotonic seconds for checkpoint intervals and retries (tests pass fakes).
    """

    def __init__(
        self,
        *,
        writer: str,
        signing_key: Ed25519PrivateKey,
        client: redis.Redis | None = None,
        directory: Path | str | None = None,
        config: AuditConfig | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Clock = time.monotonic,
    ) -> None:
        if client is None and directory is None:
            raise ValueError("an audit log needs a sink: a Redis client, a directory, or both")
        self.config = config or AuditConfig()
        self.writer = writer
        self._chain = Chain(writer, signing_key)
        self._now = now
        self._clock = clock
        self._lock = threading.Lock()
        self._last_checkpoint = clock()
        sinks: list[Sink] = []
        if directory is not None:  # the local file first: it is the cheaper, surer write
            sinks.append(FileSink(directory, writer))
        if client is not None:
            sinks.append(StreamSink(client, stream=self.config.stream, maxlen=self.config.maxlen))
        self._boxes = [_Outbox(sink) for sink in sinks]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- making records ---------------------------------------------------------------------

    def record(
        self,
        action: str,
        *,
        actor: str,
        task_id: str | None = None,
        args_digest: str | None = None,
        details: Mapping[str, str] | None = None,
    ) -> AuditRecord:
        """Add one event to the chain and queue it for the sinks (no I/O).

        `args_digest` is `audit.args_digest(body)`, never the arguments; `details`
        are a few text values (an outcome, a reason, a key id), never a secret.
        Raises ValueError/TypeError on a malformed call (a programming error).
        """
        with self._lock:
            made = self._chain.append(
                at=utc_stamp(self._now()),
                actor=actor,
                action=action,
                task_id=task_id,
                args_digest=args_digest,
                details=dict(details) if details else None,
            )
            self._queue(made)
            self._checkpoint_if_due()
        return made

    def seal(self) -> AuditRecord | None:
        """A signed checkpoint now, if any record is not yet covered by one."""
        with self._lock:
            return self._checkpoint() if self._chain.since_checkpoint else None

    def _checkpoint_if_due(self) -> None:
        since = self._chain.since_checkpoint
        if since >= self.config.checkpoint_every or (
            since and self._clock() - self._last_checkpoint >= self.config.checkpoint_interval
        ):
            self._checkpoint()

    def _checkpoint(self) -> AuditRecord:
        made = self._chain.checkpoint(at=utc_stamp(self._now()))
        self._last_checkpoint = self._clock()
        self._queue(made)
        return made

    def _queue(self, made: AuditRecord) -> None:
        for box in self._boxes:
            box.pending.append(made)
            self._bound(box)

    def _bound(self, box: _Outbox) -> None:
        excess = len(box.pending) - self.config.max_pending
        if excess <= 0:
            return
        for _ in range(excess):
            box.pending.popleft()
        if not box.dropped:
            logger.warning(
                "audit sink %s: over %d records pending; dropping the oldest "
                "(the chain will show the gap)",
                box.sink.name,
                self.config.max_pending,
            )
        box.dropped += excess

    # -- writing them -----------------------------------------------------------------------

    def flush(self) -> bool:
        """Write every pending record to every sink that is due; True if none is left.

        One write per sink: one file write, one pipelined round trip to Redis.
        A failing sink keeps its records; nothing is raised.
        """
        with self._lock:
            self._checkpoint_if_due()
        for box in self._boxes:
            batch = self._take(box)
            if batch is not None:
                self._write(box, batch)
        return not any(self.pending.values())

    def _write(self, box: _Outbox, batch: _Batch) -> None:
        try:
            box.sink.write(batch.records)
        except SINK_ERRORS as exc:
            self._failed(batch, exc)
        else:
            self._done(batch)

    def queue_flush(self, pipe: redis.client.Pipeline) -> QueuedFlush:
        """Queue the pending XADDs on `pipe` (the caller's round trip); write the file now.

        Settle the returned handle with the pipeline's replies.
        """
        with self._lock:
            self._checkpoint_if_due()
        queued = []
        for box in self._boxes:
            batch = self._take(box)
            if batch is None:
                continue
            if isinstance(box.sink, StreamSink):
                index = len(pipe)
                count = box.sink.queue(pipe, batch.records)
                queued.append(_Batch(box, batch.flight, batch.records, index, count))
                continue
            self._write(box, batch)
        return QueuedFlush(self, queued)

    def _take(self, box: _Outbox) -> _Batch | None:
        """Everything `box` has pending, now in flight; None if nothing is due."""
        with self._lock:
            now = self._clock()
            if box.in_flight is not None:
                if now - box.sent_at < self.config.stale_after:
                    return None
                box.pending.extendleft(reversed(box.in_flight))
                box.in_flight = None
                self._bound(box)
            if not box.pending or (box.down and now < box.next_try):
                return None
            records = list(box.pending)
            box.pending.clear()
            box.in_flight, box.sent_at = records, now
            box.flight += 1
            return _Batch(box, box.flight, records)

    def _done(self, batch: _Batch) -> None:
        box = batch.box
        with self._lock:
            if box.flight != batch.flight or box.in_flight is None:
                return  # stale: already put back and sent again
            box.in_flight = None
            was_down, box.down = box.down, False
        if was_down:
            logger.info("audit sink %s: writing again", box.sink.name)

    def _failed(self, batch: _Batch, exc: BaseException) -> None:
        box = batch.box
        with self._lock:
            if box.flight != batch.flight or box.in_flight is None:
                return
            box.pending.extendleft(reversed(box.in_flight))
            box.in_flight = None
            self._bound(box)
            box.next_try = self._clock() + self.config.retry_interval
            first, box.down = not box.down, True
            pending = len(box.pending)
        if first:
            logger.warning(
                "audit sink %s failing (%s); %d records kept pending (at most %d)",
                box.sink.name,
                str(exc) or repr(exc),
                pending,
                self.config.max_pending,
            )

    # -- the flusher thread -----------------------------------------------------------------

    def start(self, interval: float = 0.2) -> AuditLog:
        """Flush every `interval` seconds in a daemon thread, until `stop()`."""
        if interval <= 0:
            raise ValueError("interval must be a positive number of seconds")
        if self._thread is not None:
            raise RuntimeError("the audit flusher is already running")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name=f"audit-flusher-{self.writer}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception:  # a bug must not end the thread: records would pile up unseen
                logger.exception("audit flush failed")

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the flusher, seal the chain with a checkpoint, flush; True if all written."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout)
        self.seal()
        with self._lock:
            for box in self._boxes:  # a last try, even during an outage's back-off
                box.next_try = 0.0
        written = self.flush()
        for box in self._boxes:
            if isinstance(box.sink, FileSink):
                box.sink.close()
        return written

    # -- what it holds ----------------------------------------------------------------------

    @property
    def pending(self) -> dict[str, int]:
        """Records not yet written, by sink (in flight included)."""
        with self._lock:
            return {
                box.sink.name: len(box.pending) + len(box.in_flight or ()) for box in self._boxes
            }

    @property
    def dropped(self) -> dict[str, int]:
        """Records dropped since start because a sink's backlog was full, by sink."""
        with self._lock:
            return {box.sink.name: box.dropped for box in self._boxes}

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record made."""
        with self._lock:
            return self._chain.seq, self._chain.head
