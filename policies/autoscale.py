"""How many processes a pool (or workers a group) should run: a pure decision.

The same function sizes one worker's prefork pool (`celery worker --autoscale`,
through `workers.scaling.autoscaler`) and, from beat, a whole group of workers
(`unit`: the processes one worker brings; the load is always counted in processes).
It knows what a queue-length scaler does not:

- the work: processes busy to keep up with arrivals (`arrival_rate * run_time`,
  Little's law) plus those that drain the backlog within `drain_seconds`,
  divided by the target utilisation (0.75: the specification's 70-80 %);
- the dependency: with its breaker open a larger pool only defers tasks
  faster, so the pool does not grow and shrinks towards `min_size`; a
  bulkhead caps it at the processes that can get a permit;
- the host: above `max_cpu` or `max_memory` percent it does not grow.

Like the Kubernetes HPA it ignores changes inside `tolerance`, grows at once
(at most `max_step` processes a decision) and shrinks only to the largest size
recommended over the last `scale_down_window` seconds, so a dip in the load
does not take processes that the next burst needs (`Scaler` keeps those
recommendations; `decide` is the stateless step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from policies.errors import PolicyConfigError

__all__ = ["Decision", "Load", "Scaler", "ScalingConfig", "decide", "recommend"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalingConfig:
    """Bounds and behaviour of one pool or group."""

    min_size: int = 1
    max_size: int = 8
    #: Share of the processes that should be busy at steady load.
    target_utilization: float = 0.75
    #: Seconds the backlog should take to drain (on top of keeping up with arrivals).
    drain_seconds: float = 30.0
    #: Relative change below which the size stays (0.1: within 10 %).
    tolerance: float = 0.1
    #: Most processes added by one decision.
    max_step: int = 4
    #: Seconds of recommendations a shrink looks back over (it takes their largest).
    scale_down_window: float = 60.0
    #: Host CPU and memory percent above which the pool does not grow.
    max_cpu: float = 90.0
    max_memory: float = 90.0
    #: Processes one member brings: 1 for a pool (members are processes); for a group of
    #: workers, the pool size of one worker (members are workers, the load is processes).
    unit: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.min_size <= self.max_size:
            raise PolicyConfigError(
                f"scaling needs 0 <= min_size <= max_size, got {self.min_size} and {self.max_size}"
            )
        if not 0 < self.target_utilization <= 1:
            raise PolicyConfigError(
                f"target_utilization must be in (0, 1], got {self.target_utilization!r}"
            )
        if self.unit < 1:
            raise PolicyConfigError(f"unit must be >= 1, got {self.unit!r}")
        if self.max_step < 1:
            raise PolicyConfigError(f"max_step must be >= 1, got {self.max_step!r}")
        for name in ("drain_seconds", "scale_down_window"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise PolicyConfigError(f"{name} must be finite seconds > 0, got {value!r}")
        if not 0 <= self.tolerance < 1:
            raise PolicyConfigError(f"tolerance must be in [0, 1), got {self.tolerance!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    """What the pool sees now. Rates are tasks a second; `run_time` is seconds (None if
    no task finished yet); `bulkhead_room` is how many processes could hold a permit of
    the queues' bulkheads (None: no bulkhead)."""

    current: int
    backlog: int = 0
    arrival_rate: float = 0.0
    run_time: float | None = None
    breaker_open: bool = False
    bulkhead_room: int | None = None
    cpu_percent: float = 0.0
    memory_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """The size to run and why (`reason` is for logs, metrics and `bulwark status`)."""

    desired: int
    reason: str


def _clamp(n: int, config: ScalingConfig) -> int:
    return max(config.min_size, min(config.max_size, n))


def _finite(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def _room(load: Load, config: ScalingConfig) -> int | None:
    """The most members the bulkhead lets work (never below `min_size`); None: no bulkhead."""
    if load.bulkhead_room is None:
        return None
    return max(config.min_size, math.ceil(max(0, load.bulkhead_room) / config.unit))


def recommend(load: Load, config: ScalingConfig) -> Decision:
    """The size this load asks for, before the stabilisation window (within bounds)."""
    current = max(0, load.current)
    if load.breaker_open:
        return Decision(config.min_size, "breaker open: more processes would only defer tasks")
    backlog, arrivals = max(0, load.backlog), _finite(load.arrival_rate)
    run_time = _finite(load.run_time) if load.run_time is not None else None
    unit = config.unit
    if run_time is None:
        if backlog > current * unit:  # more waiting than processes: a step up, at most to that
            raw = float(min(current + config.max_step, math.ceil(backlog / unit)))
            reason = f"{backlog} waiting and no run time measured yet: one step up"
        elif backlog or arrivals:
            raw, reason = float(current), f"{backlog} waiting and no run time measured yet"
        else:
            raw, reason = float(config.min_size), "idle"
    else:
        busy = arrivals * run_time + backlog * run_time / config.drain_seconds
        raw = busy / config.target_utilization / unit
        reason = (
            f"{arrivals:.1f}/s x {run_time * 1000:.0f} ms and {backlog} waiting "
            f"need {busy:.1f} busy at {config.target_utilization:.0%}"
        )
        if unit > 1:
            reason += f", {unit} processes a worker"
    room = _room(load, config)
    if room is not None and raw > room:
        raw = float(room)
        reason += f"; the bulkhead has room for {room}"
        if config.unit > 1:
            reason += f" workers ({load.bulkhead_room} processes)"
    fits = room is None or current <= room
    if current and fits and abs(raw / current - 1) <= config.tolerance:
        return Decision(_clamp(current, config), f"{reason}: within {config.tolerance:.0%}")
    return Decision(_clamp(math.ceil(raw - 1e-9), config), reason)


def decide(load: Load, config: ScalingConfig, window: Sequence[int] = ()) -> Decision:
    """The size to run now, given the recommendations of the scale-down window.

    Grows at once, by at most `max_step` (and not while the host is above its CPU or
    memory guard); shrinks to the largest recommendation in `window` and this one.
    """
    current = max(0, load.current)
    wanted = recommend(load, config)
    if wanted.desired > current:
        hot = load.cpu_percent > config.max_cpu or load.memory_percent > config.max_memory
        if hot:  # up to min_size, no further
            return Decision(
                _clamp(current, config),
                f"host at {load.cpu_percent:.0f} % CPU, {load.memory_percent:.0f} % memory: "
                f"not growing ({wanted.reason})",
            )
        step = min(wanted.desired, current + config.max_step)
        return Decision(_clamp(step, config), wanted.reason)
    if wanted.desired < current:
        held = max([wanted.desired, *window])
        room = _room(load, config)
        if room is not None:
            held = min(held, room)
        if held >= current:
            return Decision(
                _clamp(current, config),
                f"{wanted.reason}; held for the scale-down window "
                f"({config.scale_down_window:.0f} s)",
            )
        return Decision(_clamp(held, config), wanted.reason)
    return Decision(_clamp(current, config), wanted.reason)


@dataclass(slots=True)
class Scaler:
    """`decide` with the scale-down window kept: call `step(load, now)` on every tick."""

    config: ScalingConfig
    #: (time, recommended size) of the last `scale_down_window` seconds.
    history: list[tuple[float, int]] = field(default_factory=list)

    def step(self, load: Load, now: float) -> Decision:
        horizon = now - self.config.scale_down_window
        self.history = [(at, n) for at, n in self.history if at > horizon]
        decision = decide(load, self.config, [n for _, n in self.history])
        self.history.append((now, recommend(load, self.config).desired))
        return decision
