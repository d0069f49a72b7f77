"""Routing of balanced tasks: which target queue each message goes to (`policies.routing`).

A task declares `balance=Balance(strategy=..., targets=(...))` next to its policies;
the app's router (`workers.celeryconfig.route_for`) asks `queue_for(name, args, kwargs)`
for every message it sends. The choice never costs a Redis call: a daemon thread of the
sending process reads one fleet snapshot of the target queues every
`BULWARK_BALANCE_REFRESH` seconds (1), which gives each target's backlog (ready and
scheduled messages) and whether it is blocked: its breaker (named as the queue) refuses
calls, or its bulkhead (named as the queue) has no permit free. Until the first snapshot,
nothing is blocked and every backlog counts as 0.

A producer that routes by task name and never imports the module that declares it
learns its `Balance` from Redis: every worker publishes what its app declares
(`publish`, at start) in one hash, `DECLARED_KEY`; the router reads it once before its
first choice in a process, then with each refresh. A declaration made in this process
wins over the published one; a published one that does not parse is skipped, and said.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from policies import keys
from policies.errors import PolicyConfigError
from policies.routing import Balance, Balancer, decode, encode
from workers.fleet import FleetSnapshot, read_fleet
from workers.resources import broker, policy_redis
from workers.settings import get_settings

__all__ = [
    "DECLARED_KEY",
    "Balanced",
    "Router",
    "declare",
    "declared",
    "forget",
    "key_of",
    "publish",
    "published",
    "router",
]

logger = logging.getLogger(__name__)

#: Breaker states in which a target takes no new work.
REFUSING = frozenset({"open", "forced_open"})

#: Hash of task name -> its `Balance` as JSON, written by every worker at start.
DECLARED_KEY = keys.key("balance", "fleet", "declared")

_declared: dict[str, Balance] = {}


def declare(
    name: str, balance: Balance, fun: Callable[..., Any] | None = None, *, bound: bool = False
) -> None:
    """Declare task `name` balanced; with its function (`bound`: its first argument is the
    task, `bind=True`), check that the key argument exists (PolicyConfigError naming it,
    at import) and note where it sits among the positional arguments."""
    if not isinstance(balance, Balance):
        raise PolicyConfigError(f"balance must be a policies.routing.Balance, got {balance!r}")
    if fun is not None and balance.key is not None:
        parameters = list(inspect.signature(fun).parameters.values())[1 if bound else 0 :]
        names = [p.name for p in parameters]
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY,
                                                          p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
        if isinstance(balance.key, str) and balance.key not in names:
            raise PolicyConfigError(
                f"task {name}: balance key {balance.key!r} is not one of its arguments "
                f"({', '.join(names) or 'none'})"
            )
        at = [i for i, p in enumerate(positional) if p.name == balance.key]
        if at:  # it may come positionally too: `send_task(name, args=[...])`
            balance = replace(balance, key_position=at[0])
        if isinstance(balance.key, int) and balance.key >= len(positional):
            raise PolicyConfigError(
                f"task {name}: balance key position {balance.key} is past its "
                f"{len(positional)} positional arguments"
            )
    _declared[name] = balance


def declared() -> Mapping[str, Balance]:
    return dict(_declared)


def publish(client: redis.Redis) -> int:
    """Publish this process's declarations for producers that route by name (one
    round trip; none if nothing is declared). How many there were."""
    if _declared:
        client.hset(DECLARED_KEY, mapping={n: encode(b) for n, b in _declared.items()})
    return len(_declared)


def published(client: redis.Redis) -> tuple[dict[str, Balance], list[str]]:
    """The declarations workers published, and a problem for each that does not parse."""
    found: dict[str, Balance] = {}
    problems = []
    raw: dict[bytes, bytes] = client.hgetall(DECLARED_KEY)  # type: ignore[assignment]
    for name, value in raw.items():
        task = name.decode("utf-8", "replace")
        try:
            found[task] = decode(value)
        except PolicyConfigError as exc:
            problems.append(f"published balance of {task[:200]!r} skipped: {exc}")
    return found, problems


def key_of(
    balance: Balance, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> str | None:
    """The task's key argument as text (a missing one: None, which hashes as "")."""
    key = balance.key
    if key is None:
        return None
    args, kwargs = args or (), kwargs or {}
    if isinstance(key, str) and key in kwargs:
        value = kwargs[key]
    else:  # by position: a keyword key may be passed so too
        at = balance.key_position if isinstance(key, str) else key
        value = args[at] if at is not None and at < len(args) else None
    return None if value is None else str(value)[:1000]


@dataclass(slots=True)
class Balanced:
    """What the router last saw of the target queues."""

    backlog: dict[str, int] = field(default_factory=dict)
    blocked: frozenset[str] = frozenset()


def state_of(snapshot: FleetSnapshot, targets: Sequence[str]) -> Balanced:
    """Backlog and blocked targets of `targets` in `snapshot`."""
    breakers = {b.name: b.state for b in snapshot.breakers}
    bulkheads = {b.name: b.available for b in snapshot.bulkheads}
    blocked = {t for t in targets if breakers.get(t) in REFUSING or bulkheads.get(t, 1) <= 0}
    return Balanced({t: snapshot.queue(t).backlog for t in targets}, frozenset(blocked))


class Router:
    """Picks the queue of each balanced task from a snapshot refreshed in the background."""

    def __init__(
        self,
        read: Callable[[Sequence[str]], FleetSnapshot],
        refresh: float,
        load: Callable[[], tuple[dict[str, Balance], list[str]]] = lambda: ({}, []),
    ) -> None:
        self._read = read
        self._load = load
        self.refresh = refresh
        self.state = Balanced()
        #: What the workers published (`published`), as last read.
        self.remote: dict[str, Balance] = {}
        #: The tasks routed in this process whose choice looks at the snapshot: only
        #: their targets are read (a producer that never sends one never reads it).
        self._wanted: set[str] = set()
        self._balancers: dict[str, Balancer] = {}
        self._lock = threading.Lock()
        self._pid = 0
        self._stop = threading.Event()
        self._said: set[str] = set()

    def balance_of(self, name: str) -> Balance | None:
        return _declared.get(name) or self.remote.get(name)

    def targets(self) -> tuple[str, ...]:
        """The target queues whose backlog and policies matter: those of the tasks routed
        here so far, but consistent hashing's, which looks at neither."""
        balances = [b for b in map(self.balance_of, sorted(self._wanted)) if b is not None]
        return tuple(sorted({t for b in balances for t in b.targets}))

    def queue_for(self, name: str, args: Any, kwargs: Any) -> str | None:
        """The queue for one message of task `name`; None if the task is not balanced."""
        self._ensure_thread()
        balance = self.balance_of(name)
        if balance is None:
            return None
        if balance.strategy != "consistent_hash":
            self._wanted.add(name)  # the thread reads its targets from the next refresh on
        state = self.state
        with self._lock:
            balancer = self._balancers.get(name)
            if balancer is None or balancer.balance != balance:
                balancer = self._balancers[name] = Balancer(balance)
            return balancer.next(backlog=state.backlog, blocked=state.blocked,
                                 key=key_of(balance, args, kwargs))  # fmt: skip

    def refresh_now(self) -> None:
        """Read the published declarations and the snapshot once (the thread's step;
        tests call it to not wait)."""
        self._load_published()
        targets = self.targets()
        if not targets:
            return
        snapshot = self._read(targets)
        if snapshot.up:
            self.state = state_of(snapshot, targets)

    def _load_published(self) -> None:
        remote, problems = self._load()
        self.remote = remote
        for problem in problems:
            self._say(problem)

    def _say(self, problem: str) -> None:
        """Log a problem once (the thread would repeat it every refresh)."""
        if problem not in self._said and len(self._said) < 1000:
            self._said.add(problem)
            logger.warning("balancing: %s", problem)

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            try:  # before the first choice: a task declared elsewhere is routed from the start
                self._load_published()
            except redis.RedisError as exc:
                self._say(f"published balances unreadable ({exc}); only this process's apply")
            threading.Thread(target=self._run, name="bulwark-balancing", daemon=True).start()

    def stop(self) -> None:
        """End the refresh thread (at its next wake-up)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh_now()
            except Exception as exc:  # a bad reading: keep the last state, try again
                self._say(f"no fresh snapshot: {exc}")
            self._stop.wait(self.refresh)


_router: Router | None = None


def forget() -> None:
    """Stop this process's router and drop it (tests: the next one reads anew)."""
    global _router
    if _router is not None:
        _router.stop()
    _router = None


def router() -> Router:
    """This process's router (reads with the app's Redis clients)."""
    global _router
    if _router is None:
        _router = Router(
            lambda queues: read_fleet(policy_redis(), broker(), queues),
            get_settings().scaling.balance_refresh,
            lambda: published(policy_redis()),
        )
    return _router
