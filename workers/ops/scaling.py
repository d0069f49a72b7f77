"""`bulwark up` acting on beat's fleet scaling decisions (`workers.scaling.fleet`).

Each worker entry of the Procfile is its group's first worker, always run. When beat
wants more workers for a group, the supervisor starts extra copies of the entry
(`worker_general.2`, `.3`, ...: hostname `general-2@host`, HTTP port chosen free);
when it wants fewer, it retires the newest extras with SIGTERM to the worker's main
process only: Celery's warm shutdown, which stops consuming, finishes the tasks it
runs, and gives back (late acks) the messages it reserved but had not started, so no
task is lost. A decision older than `STALE_AFTER` intervals (beat gone) changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from workers.scaling.fleet import GroupDecision

__all__ = ["Change", "extra_command", "extra_name", "plan_changes"]

#: A decision older than this many fleet-scaling intervals is not acted on.
STALE_AFTER = 4.0

_HOSTNAME = re.compile(r"(\s(?:-n|--hostname)[\s=])([^\s@]{1,200})@")
_PORT = re.compile(r"\bBULWARK_HTTP_PORT=\d{1,5}\b")


def extra_name(group: str, index: int) -> str:
    """The Procfile-style name of a group's `index`-th worker (`worker_general.2`)."""
    return f"{group}.{index}"


def extra_command(command: str, index: int) -> str:
    """The group's command for its `index`-th worker: its own hostname and a free port."""
    command, named = _HOSTNAME.subn(lambda m: f"{m[1]}{m[2]}-{index}@", command, count=1)
    if not named:
        raise ValueError("a worker command without -n NAME@HOST: extras need a hostname")
    return _PORT.sub("BULWARK_HTTP_PORT=0", command)


@dataclass(frozen=True, slots=True)
class Change:
    """Start or retire (warm shutdown) the `index`-th worker of `group`."""

    action: str  # "start" or "retire"
    group: str
    index: int


def plan_changes(
    decisions: Mapping[str, GroupDecision],
    extras: Mapping[str, set[int]],
    *,
    now: float,
    stale_after: float,
    retiring: Mapping[str, set[int]] | None = None,
) -> list[Change]:
    """What to start and retire so that each group of `extras` (the indexes of its
    running extra workers, 2 and up) has `desired - 1` extras: the lowest free indexes
    start (not one still `retiring`), the highest retire. Groups without a fresh decision
    stay as they are."""
    changes = []
    for group, running in sorted(extras.items()):
        decision = decisions.get(group)
        if decision is None or now - decision.at > stale_after:
            continue
        wanted = max(0, decision.desired - 1)
        if len(running) < wanted:
            taken = running | (retiring or {}).get(group, set())
            free = (i for i in range(2, 2 + wanted + len(taken)) if i not in taken)
            changes += [Change("start", group, next(free)) for _ in range(wanted - len(running))]
        elif len(running) > wanted:
            retiring = sorted(running, reverse=True)[: len(running) - wanted]
            changes += [Change("retire", group, i) for i in retiring]
    return changes
