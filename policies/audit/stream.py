"""The Redis sink: the fleet's one audit stream, and the latest checkpoint of each writer.

Records of every writer go to one stream (`XADD bulwark:audit`, trimmed with
`MAXLEN ~`), so an operator reads the whole fleet in one place. Each entry has
one field, `record`: the record's canonical JSON, exactly as hashed.

Beside the stream, a hash (`bulwark:audit:checkpoints`, one field per writer)
holds each writer's latest signed checkpoint. It is written in the same round
trip as the records (after them), and it is what lets a verifier see that a
writer's file, or the stream itself, lost records that a checkpoint had
already vouched for. It keeps one field (a few hundred bytes) per writer ever
seen, i.e. per process start: prune fields of long-gone writers if that grows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import redis

from policies.audit.record import AuditRecord, Entry, parse_entry

__all__ = [
    "AUDIT_CHECKPOINTS",
    "AUDIT_STREAM",
    "DEFAULT_MAXLEN",
    "StreamSink",
    "read_heads",
    "read_stream",
    "read_tail",
]

AUDIT_STREAM = "bulwark:audit"
AUDIT_CHECKPOINTS = "bulwark:audit:checkpoints"
#: Entries kept (about: `MAXLEN ~` trims whole radix-tree nodes, which is cheap).
DEFAULT_MAXLEN = 1_000_000
FIELD = "record"


class StreamSink:
    """XADDs records to the audit stream, in one pipelined round trip per batch."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = AUDIT_STREAM,
        checkpoints: str = AUDIT_CHECKPOINTS,
        maxlen: int = DEFAULT_MAXLEN,
    ) -> None:
        self.client = client
        self.stream = stream
        self.checkpoints = checkpoints
        self.maxlen = maxlen
        self.name = f"redis:{stream}"

    def queue(self, pipe: redis.client.Pipeline, records: Sequence[AuditRecord]) -> int:
        """Queue the batch's commands on `pipe`; how many were queued (as many replies)."""
        latest: dict[str, AuditRecord] = {}
        for record in records:
            pipe.xadd(self.stream, {FIELD: record.to_json()}, maxlen=self.maxlen, approximate=True)
            if record.is_checkpoint:
                latest[record.writer] = record
        if latest:
            pipe.hset(self.checkpoints, mapping={w: r.to_json() for w, r in latest.items()})
        return len(records) + bool(latest)

    @staticmethod
    def check(replies: Sequence[Any] | BaseException) -> None:
        """Raise the error among a batch's replies, if any."""
        if isinstance(replies, BaseException):
            raise replies
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Write a batch now: one round trip; raises redis errors."""
        with self.client.pipeline(transaction=False) as pipe:
            self.queue(pipe, records)
            self.check(pipe.execute(raise_on_error=False))


#: A stream reply as redis-py gives it: [(entry id, {field: value}), ...].
Rows = list[tuple[bytes, dict[bytes, bytes]]]


def _entry(stream: str, entry_id: bytes, data: dict[bytes, bytes]) -> Entry:
    raw = data.get(FIELD.encode(), b"")
    return parse_entry(raw, f"redis:{stream}", entry_id.decode())


def read_stream(
    client: redis.Redis, *, stream: str = AUDIT_STREAM, batch: int = 5_000
) -> Iterator[Entry]:
    """Every entry of the stream, oldest first, read `batch` at a time."""
    start = "-"
    while True:
        rows: Rows = client.xrange(stream, min=start, count=batch)  # type: ignore[assignment]
        for entry_id, data in rows:
            yield _entry(stream, entry_id, data)
        if len(rows) < batch:
            return
        start = "(" + rows[-1][0].decode()


def read_tail(
    client: redis.Redis, count: int, *, stream: str = AUDIT_STREAM, after: str | None = None
) -> tuple[list[Entry], str | None]:
    """The newest `count` entries, oldest first, and the id of the last one (else `after`).

    With `after` (an entry id), the oldest `count` entries newer than it: what
    `tail --follow` shows next.
    """
    rows: Rows
    if after is None:
        rows = list(reversed(client.xrevrange(stream, count=count)))  # type: ignore[arg-type]
    else:
        rows = client.xrange(stream, min="(" + after, count=count)  # type: ignore[assignment]
    last = rows[-1][0].decode() if rows else after
    return [_entry(stream, entry_id, data) for entry_id, data in rows], last


def read_heads(client: redis.Redis, *, key: str = AUDIT_CHECKPOINTS) -> list[Entry]:
    """The latest checkpoint of every writer that sent one."""
    found: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
    return [parse_entry(raw, f"redis:{key}", name.decode()) for name, raw in sorted(found.items())]
