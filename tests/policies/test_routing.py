"""Load balancing over target queues: the pure decision, property-tested."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.errors import PolicyConfigError
from policies.routing import STRATEGIES, Balance, Balancer, choose, decode, encode

shards = st.lists(st.sampled_from([f"q.{i}" for i in range(8)]), min_size=1, max_size=8,
                  unique=True).map(tuple)  # fmt: skip


def balance_of(strategy: str, targets: tuple[str, ...]) -> Balance:
    key = 0 if strategy == "consistent_hash" else None
    return Balance(strategy=strategy, targets=targets, key=key)


@settings(max_examples=200)
@given(st.sampled_from(STRATEGIES), shards, st.integers(0, 10_000),
       st.dictionaries(st.text(max_size=4), st.integers(-5, 100)),
       st.sets(st.sampled_from([f"q.{i}" for i in range(8)])), st.text(max_size=20))  # fmt: skip
def test_always_a_target_and_never_a_blocked_one_while_another_has_room(
    strategy: str, targets: tuple[str, ...], turn: int, backlog: dict[str, int],
    blocked: set[str], key: str,
) -> None:  # fmt: skip
    picked = choose(balance_of(strategy, targets), turn=turn, backlog=backlog,
                    blocked=blocked, key=key)  # fmt: skip
    assert picked in targets
    if strategy != "consistent_hash" and set(targets) - blocked:
        assert picked not in blocked


@given(shards)
def test_round_robin_takes_each_in_turn(targets: tuple[str, ...]) -> None:
    balancer = Balancer(balance_of("round_robin", targets))
    assert [balancer.next() for _ in targets] == list(targets)


@given(st.lists(st.integers(1, 7), min_size=1, max_size=5))
def test_weighted_gives_each_its_weight_per_cycle(weights: list[int]) -> None:
    targets = tuple(f"q.{i}" for i in range(len(weights)))
    wanted = dict(zip(targets, weights, strict=True))
    balancer = Balancer(Balance(strategy="weighted", targets=targets, weights=wanted))
    picks = Counter(balancer.next() for _ in range(sum(weights)))
    assert picks == Counter(wanted)


def test_weighted_is_smooth() -> None:
    balance = Balance(strategy="weighted", targets=("a", "b", "c"), weights={"a": 5})
    balancer = Balancer(balance)
    assert "".join(balancer.next() for _ in range(7)) == "aabacaa"  # nginx's order


@given(shards, st.dictionaries(st.sampled_from([f"q.{i}" for i in range(8)]),
                               st.integers(0, 1000)), st.integers(0, 100))  # fmt: skip
def test_least_backlog_picks_a_shortest_queue(
    targets: tuple[str, ...], backlog: dict[str, int], turn: int
) -> None:
    picked = choose(balance_of("least_backlog", targets), turn=turn, backlog=backlog)
    assert backlog.get(picked, 0) == min(backlog.get(t, 0) for t in targets)


@settings(max_examples=200)
@given(shards, st.text(max_size=30))
def test_consistent_hash_is_stable_and_moves_only_the_removed_queues_keys(
    targets: tuple[str, ...], key: str
) -> None:
    balance = balance_of("consistent_hash", targets)
    picked = choose(balance, turn=0, key=key)
    assert all(choose(balance, turn=t, key=key) == picked for t in (1, 7, 99))
    assert choose(balance, turn=0, key=key, blocked=set(targets) - {picked}) == picked
    others = tuple(t for t in targets if t != picked)
    if len(others) >= 1:  # removing another queue leaves this key where it is
        kept = tuple(t for t in targets if t != others[0])
        assert choose(balance_of("consistent_hash", kept), turn=0, key=key) == picked


def test_consistent_hash_spreads_keys() -> None:
    balance = balance_of("consistent_hash", tuple(f"q.{i}" for i in range(4)))
    spread = Counter(choose(balance, turn=0, key=f"customer-{i}") for i in range(4000))
    assert min(spread.values()) > 800, spread  # 1000 each, give or take


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"strategy": "random", "targets": ("a",)}, "unknown balancing strategy 'random'"),
        ({"strategy": "round_robin", "targets": ()}, "distinct target queues"),
        ({"strategy": "round_robin", "targets": ("a", "a")}, "distinct target queues"),
        ({"strategy": "weighted", "targets": ("a",), "weights": {"b": 2}}, "not targets"),
        ({"strategy": "weighted", "targets": ("a",), "weights": {"a": 0}}, "1-1000"),
        ({"strategy": "consistent_hash", "targets": ("a",)}, "needs key="),
        ({"strategy": "consistent_hash", "targets": ("a",), "key": -1}, "position"),
        ({"strategy": "round_robin", "targets": ("a",), "key": "x"}, "for consistent_hash"),
    ],
)
def test_a_bad_declaration_is_refused(options: dict, problem: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(PolicyConfigError, match=problem):
        Balance(**options)


@settings(max_examples=200)
@given(st.sampled_from(STRATEGIES), shards, st.data())
def test_a_declaration_survives_its_json(
    strategy: str, targets: tuple[str, ...], data: st.DataObject
) -> None:
    weights = data.draw(st.dictionaries(st.sampled_from(targets), st.integers(1, 1000)))
    key = data.draw(st.one_of(st.text(max_size=10), st.integers(0, 5)))
    hashed = strategy == "consistent_hash"
    position = data.draw(st.none() | st.integers(0, 5)) if hashed and isinstance(key, str) else None
    balance = Balance(strategy=strategy, targets=targets, weights=weights,
                      key=key if hashed else None, key_position=position)  # fmt: skip
    assert decode(encode(balance)) == balance


@settings(max_examples=300)
@given(st.one_of(
    st.binary(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=4)
                 | st.dictionaries(st.sampled_from(["strategy", "targets", "weights", "key",
                                                   "key_position", "x"]),
                                   inner, max_size=5)).map(json.dumps),
))  # fmt: skip
def test_a_hostile_declaration_is_a_clear_refusal(text: str | bytes) -> None:
    """Read from Redis, a declaration may be anything: a Balance, or a PolicyConfigError."""
    try:
        decode(text)
    except PolicyConfigError as exc:
        assert str(exc)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[", "not JSON"),
        ('{"strategy": "round_robin"}', "object of key, key_position, strategy, targets"),
        (
            '{"strategy": "round_robin", "targets": ["a b"], "weights": {}, "key": null, '
            '"key_position": null}',
            "queue names",
        ),
        (
            '{"strategy": "round_robin", "targets": ["a"], "weights": {}, "key": true, '
            '"key_position": null}',
            "key must",
        ),
        (
            '{"strategy": "consistent_hash", "targets": ["a"], "weights": {}, "key": "k", '
            '"key_position": -1}',
            "key_position",
        ),
        ("[" * 100_000, "bytes"),
    ],
)
def test_what_a_bad_declaration_is_told(text: str, problem: str) -> None:
    with pytest.raises(PolicyConfigError, match=problem):
        decode(text)
