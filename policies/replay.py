"""Replay protection: a signed message's id (jti) is accepted once, fleet-wide.

A broker delivers at least once: a worker that dies before acknowledging a
message gets it redelivered, identical, jti included. So a jti has two states,
kept until the message expires:

- "a" (delivered, not yet acknowledged): seen again, it is a redelivery, and runs;
- "d" (acknowledged: it ran, or was refused for good): seen again, it is a replay,
  and is refused.

Both steps ride on round trips the transport makes anyway (recording the
delivery in the unacked index; removing it on acknowledgement), so replay
protection adds no round trip of its own. On Redis 7 the first step is one
native `SET key a NX GET EX`; before 7 (NX and GET not together) a Lua step.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import redis

from policies import keys
from policies.scripts import Queued, Scripts

__all__ = ["Replays", "Seen"]

Seen = Literal["first", "redelivered", "replayed"]
_STATES: dict[Any, Seen] = {None: "first", b"a": "redelivered", "a": "redelivered"}

#: Kept at least this long, at most `MAX_KEEP`, whatever a message's expiry says.
MIN_KEEP, MAX_KEEP = 60, 8 * 24 * 3600
#: The jti `Replays.native` tries its command with (no message has it: not hex).
PROBE = "probe"


def key(jti: str) -> str:
    return keys.key("jti", jti, "seen")


def keep_for(exp: float, now: float | None = None) -> int:
    """Seconds to remember a jti: until the message expires, plus a minute."""
    now = time.time() if now is None else now
    return int(max(MIN_KEEP, min(MAX_KEEP, exp - now + MIN_KEEP)))


def state(reply: Any) -> Seen:
    """What a `queue_seen` reply says of the message."""
    return _STATES.get(reply, "replayed")


class _Reply:
    """The reply of a native `SET NX GET` at `index` of a pipeline's results."""

    def __init__(self, index: int) -> None:
        self.index = index

    def reply(self, results: Any) -> Any:
        return results if isinstance(results, BaseException) else results[self.index]


class Replays:
    """The fleet-wide record of delivered and acknowledged message ids (jti)."""

    def __init__(self, client: redis.Redis, *, native: bool | None = None) -> None:
        self._scripts = Scripts(client)
        self._client = client
        self._native = native

    def native(self) -> bool:
        """Whether this Redis takes `SET key a NX GET` (7.0 and later: one native command,
        cheaper than Lua). Asked once, by trying it (INFO may be refused by an ACL)."""
        if self._native is None:
            try:
                self._client.set(key(PROBE), "a", nx=True, get=True, ex=MIN_KEEP)
                self._native = True
            except redis.ResponseError:
                self._native = False
        return self._native

    def queue_seen(self, pipe: redis.client.Pipeline, jti: str, exp: float) -> Queued | _Reply:
        """Note `jti` as delivered on `pipe`; `state(handle.reply(results))` says how."""
        if self.native():
            index = len(pipe)
            # By name: redis-py's `set()` spends more Python on its options than the command.
            command = ("SET", key(jti), "a", "NX", "GET", "EX", keep_for(exp))
            pipe.execute_command(*command, get=True)  # type: ignore[no-untyped-call]
            return _Reply(index)
        return self._scripts.queue(pipe, "jti_seen", [key(jti)], [keep_for(exp)])

    def seen(self, jti: str, exp: float) -> Seen:
        """`queue_seen`, in a round trip of its own."""
        return state(self._scripts["jti_seen"](keys=[key(jti)], args=[keep_for(exp)]))

    @staticmethod
    def queue_done(pipe: Any, jti: str) -> None:
        """Mark `jti` acknowledged: any later delivery of it is a replay."""
        pipe.execute_command("SET", key(jti), "d", "XX", "KEEPTTL")
