"""The autoscale decision: bounds, the breaker, the bulkhead, the host guard, no flapping."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.autoscale import Decision, Load, Scaler, ScalingConfig, decide, recommend
from policies.errors import PolicyConfigError

configs = st.builds(
    lambda lo, extra, step, tol, unit: ScalingConfig(
        min_size=lo, max_size=lo + extra, max_step=step, tolerance=tol, unit=unit
    ),
    st.integers(0, 4),
    st.integers(0, 16),
    st.integers(1, 6),
    st.sampled_from([0.0, 0.1, 0.2]),
    st.sampled_from([1, 1, 2, 4, 6]),  # 1: a pool; more: a group of workers of that pool size
)
loads = st.builds(
    Load,
    current=st.integers(0, 24),
    backlog=st.integers(0, 100_000),
    arrival_rate=st.floats(0, 10_000, allow_nan=False),
    run_time=st.one_of(st.none(), st.floats(0, 60, allow_nan=False)),
    breaker_open=st.booleans(),
    bulkhead_room=st.one_of(st.none(), st.integers(0, 30)),
    cpu_percent=st.floats(0, 100),
    memory_percent=st.floats(0, 100),
)
windows = st.lists(st.integers(0, 30), max_size=8)


@settings(max_examples=150)
@given(loads, configs, windows)
def test_never_outside_min_and_max(load: Load, config: ScalingConfig, window: list[int]) -> None:
    decision = decide(load, config, window)
    assert config.min_size <= decision.desired <= config.max_size
    assert decision.reason


@settings(max_examples=150)
@given(loads, configs, windows)
def test_never_grows_while_the_breaker_is_open(
    load: Load, config: ScalingConfig, window: list[int]
) -> None:
    open_ = Load(**{**_fields(load), "breaker_open": True})
    assert decide(open_, config, window).desired <= max(open_.current, config.min_size)
    assert recommend(open_, config).desired == config.min_size


@settings(max_examples=150)
@given(loads, configs, windows)
def test_never_above_what_the_bulkhead_can_use(
    load: Load, config: ScalingConfig, window: list[int]
) -> None:
    if load.bulkhead_room is not None:
        members = -(-max(0, load.bulkhead_room) // config.unit)  # workers that bring the room
        assert decide(load, config, window).desired <= max(members, config.min_size)


@settings(max_examples=150)
@given(loads, configs, windows)
def test_grows_by_at_most_a_step_and_not_on_a_hot_host(
    load: Load, config: ScalingConfig, window: list[int]
) -> None:
    decision = decide(load, config, window)
    floor = max(load.current, config.min_size)
    assert decision.desired <= max(floor, min(load.current + config.max_step, config.max_size))
    hot = Load(**{**_fields(load), "cpu_percent": config.max_cpu + 1})
    assert decide(hot, config, window).desired <= floor


@settings(max_examples=100)
@given(
    configs,
    st.integers(1, 16),
    st.floats(0.1, 500, allow_nan=False),
    st.floats(0.001, 5, allow_nan=False),
)
def test_a_steady_load_settles_and_stays(
    config: ScalingConfig, start: int, rate: float, run_time: float
) -> None:
    """Under one load the size stops changing after a few ticks, and never flaps."""
    scaler = Scaler(config)
    size, sizes = start, []
    for tick in range(40):
        size = scaler.step(Load(current=size, arrival_rate=rate, run_time=run_time), tick * 15.0)
        size = size.desired
        sizes.append(size)
    settled = sizes[-10:]
    assert len(set(settled)) == 1, sizes
    direction = [b - a for a, b in itertools.pairwise(sizes) if b != a]
    assert all(d > 0 for d in direction) or all(d < 0 for d in direction), sizes


def test_little_law_at_the_target_utilisation() -> None:
    config = ScalingConfig(min_size=1, max_size=64, max_step=64, tolerance=0.0)
    # 30 tasks/s of 200 ms keep 6 processes busy; at 75 % that is 8.
    assert decide(Load(current=2, arrival_rate=30, run_time=0.2), config).desired == 8
    # A backlog of 900 of 200 ms to drain in 30 s adds 6 busy: 16 at 75 %.
    load = Load(current=2, arrival_rate=30, run_time=0.2, backlog=900)
    assert decide(load, config).desired == 16


def test_shrinks_only_to_the_largest_size_of_the_window() -> None:
    config = ScalingConfig(min_size=1, max_size=16, scale_down_window=60)
    scaler = Scaler(config)
    busy, idle = Load(current=8, arrival_rate=30, run_time=0.2), Load(current=8)
    assert scaler.step(busy, 0.0).desired == 8
    held = scaler.step(idle, 15.0)
    assert held.desired == 8 and "held" in held.reason
    assert scaler.step(idle, 59.0).desired == 8
    assert scaler.step(idle, 61.0).desired == 1  # the busy tick left the window


def test_grows_in_steps_without_a_run_time() -> None:
    config = ScalingConfig(min_size=1, max_size=10, max_step=3)
    decision = decide(Load(current=2, backlog=50), config)
    assert decision == Decision(5, "50 waiting and no run time measured yet: one step up")


def test_a_group_counts_workers_of_a_pool_size() -> None:
    """For a group the load is in processes and the answer in workers of `unit` each."""
    config = ScalingConfig(min_size=1, max_size=10, max_step=10, tolerance=0.0, unit=4)
    # 30 tasks/s of 200 ms: 8 processes at 75 %, two workers of 4.
    decision = decide(Load(current=1, arrival_rate=30, run_time=0.2), config)
    assert decision.desired == 2 and "4 processes a worker" in decision.reason
    # A bulkhead of 4 permits: one worker of 4 can use them all.
    capped = decide(Load(current=1, arrival_rate=300, run_time=0.2, bulkhead_room=4), config)
    assert capped.desired == 1
    # No run time yet: 6 waiting need two workers, 3 waiting fit in the one.
    assert decide(Load(current=1, backlog=6), config).desired == 2
    assert decide(Load(current=1, backlog=3), config).desired == 1


def test_the_bulkhead_caps_and_says_so() -> None:
    config = ScalingConfig(min_size=1, max_size=32, max_step=32)
    decision = decide(Load(current=2, arrival_rate=100, run_time=0.5, bulkhead_room=4), config)
    assert decision.desired == 4 and "bulkhead has room for 4" in decision.reason


def test_hostile_numbers_are_harmless() -> None:
    config = ScalingConfig()
    for load in (
        Load(current=-3, backlog=-10, arrival_rate=float("inf"), run_time=float("nan")),
        Load(current=4, arrival_rate=float("nan"), run_time=-1.0, bulkhead_room=-2),
    ):
        assert config.min_size <= decide(load, config).desired <= config.max_size


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"min_size": 5, "max_size": 2}, "min_size"),
        ({"target_utilization": 0}, "target_utilization"),
        ({"max_step": 0}, "max_step"),
        ({"drain_seconds": float("inf")}, "drain_seconds"),
        ({"tolerance": 1.0}, "tolerance"),
    ],
)
def test_bad_config_names_the_field(options: dict[str, float], field: str) -> None:
    with pytest.raises(PolicyConfigError, match=field):
        ScalingConfig(**options)  # type: ignore[arg-type]


def _fields(load: Load) -> dict[str, object]:
    return {name: getattr(load, name) for name in Load.__dataclass_fields__}
