"""Which of several queues a task goes to: load balancing as a pure decision.

A task that may run on more than one queue (the shards `payments.0..3` of one
dependency, or replica groups) declares a `Balance`: its target queues and a
strategy.

- `round_robin`: each in turn;
- `weighted`: in turn, each as often as its weight (smooth weighted round robin,
  as nginx does: no burst on the heaviest);
- `least_backlog`: the queue with the fewest waiting messages in the last
  snapshot (ties in turn);
- `consistent_hash`: by a declared key argument (a customer id): every task of
  one key goes to one queue, in order, and adding or removing a queue moves only
  the keys of that queue (rendezvous hashing).

A target that is `blocked` (its breaker open, its bulkhead saturated) gets no new
work while another has room; when all are blocked, all are eligible again (the
policies then defer the task). Consistent hashing ignores blocking: moving a key to
another queue would break the order of its tasks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.errors import PolicyConfigError
from policies.keys import safe

__all__ = ["STRATEGIES", "Balance", "Balancer", "choose", "decode", "encode"]

#: At most this many target queues per task, and this many bytes of a declaration.
MAX_TARGETS = 256
MAX_DECLARATION = 64 * 1024

STRATEGIES = ("round_robin", "weighted", "least_backlog", "consistent_hash")


@dataclass(frozen=True, slots=True, kw_only=True)
class Balance:
    """How a task spreads over its target queues (validated when declared)."""

    strategy: str
    targets: tuple[str, ...]
    #: Per target, for `weighted` (positive whole numbers; 1 when not given).
    weights: Mapping[str, int] = field(default_factory=dict)
    #: The argument whose value `consistent_hash` hashes (a keyword, or a position).
    key: str | int | None = None
    #: Where a keyword `key` sits among the positional arguments, if it may be passed
    #: so (filled in from the task's signature when it is declared).
    key_position: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PolicyConfigError(
                f"unknown balancing strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}"
            )
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise PolicyConfigError(f"balancing needs distinct target queues, got {self.targets}")
        unknown = set(self.weights) - set(self.targets)
        if unknown:
            raise PolicyConfigError(f"weights for queues that are not targets: {sorted(unknown)}")
        if any(not isinstance(w, int) or not 1 <= w <= 1000 for w in self.weights.values()):
            raise PolicyConfigError(f"weights must be whole numbers 1-1000, got {self.weights}")
        if self.strategy == "consistent_hash":
            if self.key is None or isinstance(self.key, bool):
                raise PolicyConfigError("consistent_hash needs key= (an argument name or position)")
            if isinstance(self.key, int) and self.key < 0:
                raise PolicyConfigError(f"key position must be >= 0, got {self.key}")
        elif self.key is not None:
            raise PolicyConfigError(f"key= is for consistent_hash, not {self.strategy}")
        if self.key_position is not None and (
            not isinstance(self.key, str) or isinstance(self.key_position, bool)
            or not isinstance(self.key_position, int) or self.key_position < 0
        ):  # fmt: skip
            raise PolicyConfigError("key_position is a position >= 0, for a keyword key")
        if len(self.targets) > MAX_TARGETS:
            raise PolicyConfigError(f"at most {MAX_TARGETS} target queues, got {len(self.targets)}")

    def weight(self, target: str) -> int:
        return self.weights.get(target, 1)


def encode(balance: Balance) -> str:
    """`balance` as JSON (what a worker publishes for producers that route by task name)."""
    return json.dumps(
        {
            "strategy": balance.strategy,
            "targets": list(balance.targets),
            "weights": dict(balance.weights),
            "key": balance.key,
            "key_position": balance.key_position,
        },
        sort_keys=True,
    )


def decode(text: str | bytes) -> Balance:
    """The `Balance` that `encode` wrote; anything else (it is read from Redis, where
    anyone with write access could put anything) is a PolicyConfigError that says why."""
    if len(text) > MAX_DECLARATION:
        raise PolicyConfigError(f"declaration of {len(text)} bytes (at most {MAX_DECLARATION})")
    try:
        raw: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PolicyConfigError(f"declaration is not JSON: {type(exc).__name__}") from None
    fields = {"strategy", "targets", "weights", "key", "key_position"}
    if not isinstance(raw, dict) or set(raw) != fields:
        raise PolicyConfigError(f"declaration must be an object of {', '.join(sorted(fields))}")
    strategy, targets, weights, key = raw["strategy"], raw["targets"], raw["weights"], raw["key"]
    if not isinstance(strategy, str):
        raise PolicyConfigError("declaration's strategy must be a string")
    if not isinstance(targets, list) or not all(
        isinstance(t, str) and len(t) <= 200 and safe(t) for t in targets
    ):
        raise PolicyConfigError(
            "declaration's targets must be queue names (A-Z a-z 0-9 _ . : @ -, 200 at most)"
        )
    if not isinstance(weights, dict):
        raise PolicyConfigError("declaration's weights must be an object")
    if not (
        key is None or isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))
    ):
        raise PolicyConfigError("declaration's key must be a name, a position or null")
    position = raw["key_position"]
    return Balance(strategy=strategy, targets=tuple(targets), weights=weights, key=key,
                   key_position=position)  # fmt: skip


def _score(key: str, target: str) -> int:
    digest = hashlib.blake2b(f"{target}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose(
    balance: Balance,
    *,
    turn: int,
    backlog: Mapping[str, int] | None = None,
    blocked: Collection[str] = (),
    key: str | None = None,
) -> str:
    """The target queue for one task.

    `turn` counts this balancer's choices (round robin's position); `backlog` is the
    last snapshot of waiting messages per target (missing: unknown, counted as 0);
    `key` is the task's key argument, as text (`consistent_hash` only).
    """
    targets = balance.targets
    if balance.strategy == "consistent_hash":
        return max(targets, key=lambda t: (_score(key or "", t), t))
    eligible = [t for t in targets if t not in blocked] or list(targets)
    if balance.strategy == "least_backlog":
        counts = backlog or {}
        fewest = min(max(0, counts.get(t, 0)) for t in eligible)
        tied = [t for t in eligible if max(0, counts.get(t, 0)) == fewest]
        return tied[turn % len(tied)]
    if balance.strategy == "weighted":
        total = sum(balance.weight(t) for t in eligible)
        return _smooth_weighted(eligible, balance, turn % total)
    return eligible[turn % len(eligible)]


def _smooth_weighted(eligible: list[str], balance: Balance, step: int) -> str:
    """The `step`-th pick of smooth weighted round robin over `eligible` (from zero)."""
    current = dict.fromkeys(eligible, 0)
    total = sum(balance.weight(t) for t in eligible)
    pick = eligible[0]
    for _ in range(step + 1):
        for t in eligible:
            current[t] += balance.weight(t)
        pick = max(eligible, key=lambda t: current[t])
        current[pick] -= total
    return pick


@dataclass(slots=True)
class Balancer:
    """`choose` with the turn kept (one per task and process)."""

    balance: Balance
    turn: int = 0

    def next(self, *, backlog: Mapping[str, int] | None = None,
             blocked: Collection[str] = (), key: str | None = None) -> str:  # fmt: skip
        picked = choose(self.balance, turn=self.turn, backlog=backlog, blocked=blocked, key=key)
        self.turn += 1
        return picked
