"""The dead-letter store: tasks that could not run, kept with their reason.

Nothing is dropped: a permanent failure, an exhausted retry or deferral
budget, or a message the worker refused to decode lands here, and can be
listed and replayed (`bulwark deadletter list|replay`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis

from policies import keys
from policies.scripts import Scripts

DEFAULT_MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """One dead-lettered task and why it is here."""

    task_name: str
    reason: str
    task_id: str | None = None
    queue: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 0
    #: For messages refused before decoding: the raw body (base64) and its type.
    content_type: str | None = None
    raw_body: str | None = None
    #: The refused message's length in bytes (`raw_body` keeps at most its first 64 KiB).
    raw_size: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    dead_at: float | None = None

    @property
    def replayable(self) -> bool:
        return self.raw_body is None

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("dead_at")
        return json.dumps(data, default=repr)

    @classmethod
    def from_json(cls, raw: str | bytes, dead_at: float | None = None) -> DeadLetter:
        """Parse a stored entry; one that does not parse is shown as such, never raised."""
        try:
            data = json.loads(raw)
            known = {k: v for k, v in data.items() if k in _FIELDS and k != "dead_at"}
            return cls(**known, dead_at=dead_at)
        except (ValueError, TypeError, AttributeError) as exc:
            return cls(
                task_name="<unreadable entry>",
                reason=f"the stored entry does not parse: {exc}",
                dead_at=dead_at,
            )


_FIELDS = frozenset(f.name for f in fields(DeadLetter))


class DeadLetterStore:
    """Dead letters of one queue family in Redis (hash + time index)."""

    def __init__(
        self, client: redis.Redis, name: str = "main", max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        self._client = client
        self._scripts = Scripts(client)
        self._entries = keys.key("deadletter", name, "entries")
        self._index = keys.key("deadletter", name, "index")
        self._total = keys.key("deadletter", name, "total")
        self._max = max_entries

    def add(self, letter: DeadLetter) -> DeadLetter:
        now = self._scripts["deadletter_add"](
            keys=[self._entries, self._index, self._total],
            args=[letter.id, letter.to_json(), self._max],
        )
        return DeadLetter(**{**asdict(letter), "dead_at": float(now)})

    def latest(self, limit: int = 50) -> list[DeadLetter]:
        """The newest `limit` entries, newest first, each with its `dead_at`."""
        rows: list[tuple[bytes, float]] = self._client.zrevrange(  # type: ignore[assignment]
            self._index, 0, limit - 1, withscores=True
        )
        if not rows:
            return []
        raws = self._client.hmget(self._entries, [row[0] for row in rows])
        return [
            DeadLetter.from_json(raw, dead_at=float(at))
            for (_, at), raw in zip(rows, raws, strict=True)
            if raw is not None
        ]

    def get(self, letter_id: str) -> DeadLetter | None:
        with self._client.pipeline(transaction=False) as pipe:
            pipe.hget(self._entries, letter_id)
            pipe.zscore(self._index, letter_id)
            raw, at = pipe.execute()
        return None if raw is None else DeadLetter.from_json(raw, float(at) if at else None)

    def remove(self, letter_id: str) -> bool:
        with self._client.pipeline(transaction=True) as pipe:
            pipe.hdel(self._entries, letter_id)
            pipe.zrem(self._index, letter_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def queue_counts(self, pipe: redis.client.Pipeline) -> None:
        """Queue the reads of `count()` and `total()` on `pipe` (two replies, in that order)."""
        pipe.zcard(self._index)
        pipe.get(self._total)

    @staticmethod
    def read_counts(replies: Sequence[Any]) -> tuple[int, int]:
        """(count, total) from the two replies `queue_counts` queued."""
        count, total = replies
        return int(count), int(total or 0)

    def count(self) -> int:
        return int(self._client.zcard(self._index))

    def total(self) -> int:
        """Every entry ever added (a counter that only grows)."""
        return int(self._client.get(self._total) or 0)
