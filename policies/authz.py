"""Authorization: may this producer enqueue this task on this queue? A pure decision.

Patterns are shell-style globs with `*` only (`payments.*`, `*`); they are
matched by `glob_match`, which walks the text once per pattern segment, so a
hostile task name costs time linear in its length, whatever the pattern.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Grant", "authorize", "glob_match"]


def glob_match(pattern: str, text: str) -> bool:
    """`fnmatch` for `*` alone (every other character is literal), in linear time.

    The segments between stars must appear in order; the first must start the
    text and the last must end it. Greedy leftmost matching of each middle
    segment is optimal for `*`-only globs, so no backtracking is ever needed.
    """
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == text
    first, *middle, last = parts
    if not text.startswith(first):
        return False
    at = len(first)
    for part in middle:
        found = text.find(part, at)
        if found < 0:
            return False
        at = found + len(part)
    return len(text) - at >= len(last) and text.endswith(last)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one identity may enqueue. Empty `tasks` allows nothing (deny by default)."""

    tasks: tuple[str, ...] = ()
    #: Queue globs; empty means any queue its tasks route to.
    queues: tuple[str, ...] = ()
    #: Largest message body, in bytes (None: no limit beyond the worker's own).
    max_payload: int | None = None
    #: Messages per second the client may send (enforced at the enqueue edge).
    rate: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _any(patterns: Iterable[str], text: str) -> bool:
    return any(glob_match(p, text) for p in patterns)


def authorize(grant: Grant | None, task: str, queue: str, size: int) -> str | None:
    """Why `grant` does not allow sending `task` (body of `size` bytes) to `queue`;
    None if it does."""
    if grant is None:
        return "no grant: denied by default"
    if not _any(grant.tasks, task):
        return f"not allowed to send {task!r}"
    if grant.queues and not _any(grant.queues, queue):
        return f"not allowed to send to queue {queue!r}"
    if grant.max_payload is not None and size > grant.max_payload:
        return f"payload of {size} bytes is over its limit of {grant.max_payload}"
    return None
