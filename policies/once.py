"""Execute once: a task that must not run twice, fleet-wide, keyed by its task id.

A broker delivers at least once: a worker killed after the body ran but before
the acknowledgement, or a consumer that reconnects, hands the same task to a
worker again. For a non-idempotent job (a payment) that is a second charge.

    once = ExecuteOnce(client)
    claim = once.begin(task_id, owner="host:pid")
    claim.action == "run"      -> run the body, then `queue_finish(pipe, task_id, result)`
                                  (or `queue_abandon` if it failed, so a retry may run)
    claim.action == "done"     -> it ran already: `claim.result` is what it returned
    claim.action == "running"  -> a delivery began `claim.age` seconds ago and has not
                                  finished: still running (wait) or interrupted (do not run)
    claim.action == "failed"   -> it ran and failed for good (`fail` after dead-lettering):
                                  `claim.reason` says why; a late duplicate does not run it

One Lua step per claim (`lua/once_begin.lua`), timed by Redis TIME. The entry
is kept for `keep` seconds (the result backend's expiry), so a redelivery within
that time finds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import redis

from policies import keys
from policies.scripts import Scripts

__all__ = ["Claim", "ExecuteOnce"]

Action = Literal["run", "done", "running", "failed"]


@dataclass(frozen=True, slots=True)
class Claim:
    """What `ExecuteOnce.begin` found."""

    action: Action
    result: Any = None
    owner: str = ""
    #: Seconds since the unfinished delivery began ("running" only).
    age: float = 0.0
    #: Why it failed ("failed" only).
    reason: str = ""


class ExecuteOnce:
    """At-most-once execution of tasks by id, shared by the fleet through Redis."""

    def __init__(self, client: redis.Redis, *, keep: float = 24 * 3600.0) -> None:
        self._client = client
        self._scripts = Scripts(client)
        self.keep = keep

    @staticmethod
    def key(task_id: str) -> str:
        """The entry of `task_id` (hashed: a task id may hold any character)."""
        digest = hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return keys.key("once", digest, "entry")

    def begin(self, task_id: str, owner: str) -> Claim:
        raw = self._scripts["once_begin"](keys=[self.key(task_id)], args=[owner, int(self.keep)])
        action = _text(raw[0])
        if action == "run":
            return Claim("run")
        if action == "done":
            return Claim("done", result=json.loads(raw[1]))
        if action == "failed":
            return Claim("failed", reason=_text(raw[1]))
        return Claim("running", owner=_text(raw[1]), age=float(raw[2]))

    def queue_finish(self, pipe: redis.client.Pipeline, task_id: str, result: Any) -> None:
        """Record the result (on the caller's pipeline): later deliveries return it."""
        key = self.key(task_id)
        pipe.hset(key, mapping={"state": "done", "result": encode(result)})
        pipe.expire(key, int(self.keep))

    def queue_abandon(self, pipe: redis.client.Pipeline, task_id: str) -> None:
        """Forget the claim (the body failed or never ran): a retry may run it."""
        pipe.delete(self.key(task_id))

    def abandon(self, task_id: str) -> None:
        self._client.delete(self.key(task_id))

    def fail(self, task_id: str, reason: str) -> None:
        """It failed for good (dead-lettered): a late duplicate delivery must not run it.

        The claim was released when the body failed (a retry, same task id, may run);
        this marks the end. A replay of the dead letter is a new task id, so it runs.
        """
        key = self.key(task_id)
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(key, mapping={"state": "failed", "reason": reason[:1000]})
        pipe.expire(key, int(self.keep))
        pipe.execute()


def encode(result: Any) -> str:
    """The result as JSON; as the JSON of its repr if it is not JSON (never raises)."""
    try:
        return json.dumps(result, default=repr)
    except (TypeError, ValueError, RecursionError):
        return json.dumps(repr(result)[:10_000])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
