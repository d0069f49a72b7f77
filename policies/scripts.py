"""Lua scripts shipped as package data (`policies/lua/*.lua`), registered once per client.

A script is called directly (`Scripts(client)[name](keys=..., args=...)`: EVALSHA,
re-loading it after a server restart flushed the script cache), or queued on a
caller's pipeline as a bare EVALSHA (`Scripts.queue`), so that it shares that
pipeline's one round trip; the `Queued` handle then reads its reply, and runs
it again directly if the server answered NOSCRIPT.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis
from redis.cluster import ClusterPipeline

from policies.clock import Clock

__all__ = ["Queued", "ScriptedRedisStore", "Scripts", "reply_at", "source"]


def _read_all() -> dict[str, str]:
    folder = resources.files("policies").joinpath("lua")
    return {
        entry.name.removesuffix(".lua"): entry.read_text("utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".lua")
    }


#: Every script's text, read once at import, before any pool process forks. Read later
#: in a child, `importlib.resources` takes import locks; a child forked (by --autoscale,
#: from the worker's main thread) while another thread of the parent held one of those
#: waits for it forever: its first task hung, and so did the worker's warm shutdown.
_SOURCES = _read_all()


def source(name: str) -> str:
    """The text of `policies/lua/<name>.lua`."""
    try:
        return _SOURCES[name]
    except KeyError:
        raise KeyError(f"no script policies/lua/{name}.lua") from None


@dataclass(slots=True)
class _Registry:
    """The scripts registered on one client, and which of them were loaded for `queue`."""

    scripts: dict[str, Any] = field(default_factory=dict)
    queued: set[str] = field(default_factory=set)


#: Shared by every `Scripts` of one client, so that a NOSCRIPT seen by one policy
#: reloads the scripts of all of them.
_registries: weakref.WeakKeyDictionary[redis.Redis, _Registry] = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


class Scripts:
    """Registers scripts on one client the first time each is used.

    `register_script` returns an object that calls EVALSHA and falls back to
    EVAL (re-loading the script) after a server restart flushed its cache.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        with _registries_lock:
            registry = _registries.get(client)
            if registry is None:
                registry = _registries[client] = _Registry()
        self._registry = registry

    def __getitem__(self, name: str) -> Any:
        script = self._registry.scripts.get(name)
        if script is None:
            script = self._registry.scripts[name] = self._client.register_script(source(name))
        return script

    def queue(
        self, pipe: redis.client.Pipeline, name: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Queued:
        """Queue script `name` on `pipe` as a bare EVALSHA; read its reply with the handle.

        Calling the registered script with `client=pipe` would make the pipeline
        send SCRIPT EXISTS first: one more round trip on every call. Instead the
        first call on this client is an EVAL of the source, which loads it.
        """
        script = self[name]
        index = len(pipe)
        # By name, not `pipe.evalsha`: a cluster pipeline blocks its script methods. It
        # would also ask a node for the keys of each (COMMAND GETKEYS, a round trip per
        # script): it is told the node that serves their slot (hash-tagged: one slot).
        target = _target(pipe, keys)
        if name in self._registry.queued:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, **target)  # type: ignore[no-untyped-call]
        else:
            # The first call sends the source (EVAL caches it on the server): no round
            # trip of its own, and nothing raised here while Redis is unreachable. (On a
            # cluster only that node has it: another node answers NOSCRIPT once, and
            # `Queued.reply` loads it everywhere.)
            pipe.execute_command("EVAL", script.script, len(keys), *keys, *args, **target)  # type: ignore[no-untyped-call]
            self._registry.queued.add(name)
        return Queued(self, name, keys, args, index)

    def reload(self) -> None:
        """Load every script registered on this client again (after NOSCRIPT)."""
        for script in list(self._registry.scripts.values()):
            self._client.script_load(script.script)


def _target(pipe: Any, keys: Sequence[str]) -> dict[str, Any]:
    """`target_nodes` for a script queued on a cluster pipeline (nothing for one Redis)."""
    if isinstance(pipe, ClusterPipeline) and keys:
        return {"target_nodes": pipe.get_node_from_key(keys[0])}  # type: ignore[no-untyped-call]
    return {}


def reply_at(results: Sequence[Any] | BaseException, index: int) -> Any:
    """Entry `index` of `pipe.execute(raise_on_error=False)`, or the error `execute` raised."""
    return results if isinstance(results, BaseException) else results[index]


@dataclass(frozen=True, slots=True)
class Queued:
    """A script call queued on a pipeline by `Scripts.queue`."""

    scripts: Scripts
    name: str
    keys: Sequence[str]
    args: Sequence[Any]
    #: Position of the call in the pipeline's results.
    index: int

    def reply(self, results: Sequence[Any] | BaseException) -> Any:
        """The call's reply, given `pipe.execute(raise_on_error=False)`'s results (or the
        error `execute` raised); an error is returned, not raised.

        A NOSCRIPT reply means the server lost its script cache (a restart) and
        did not run the call: the client's scripts are loaded again and this
        call runs once more, directly.
        """
        raw = reply_at(results, self.index)
        if isinstance(raw, redis.exceptions.NoScriptError):
            try:
                self.scripts.reload()
                raw = self.scripts[self.name](keys=list(self.keys), args=list(self.args))
            except redis.RedisError as exc:
                raw = exc
        return raw


class ScriptedRedisStore:
    """Base of Redis stores whose scripts read Redis TIME unless a test clock is given.

    `clock` is for tests only: it replaces Redis TIME so tests can move time.
    """

    source = "redis"

    def __init__(self, client: redis.Redis, *, clock: Clock | None = None) -> None:
        self.client = client
        self._scripts = Scripts(client)
        self._clock = clock

    def _now(self) -> str:
        """The `now` ARGV of a script: "" lets the script read TIME."""
        return "" if self._clock is None else repr(self._clock())
