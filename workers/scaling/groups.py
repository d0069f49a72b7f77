"""The worker groups of the Procfile: what beat's fleet scaler sizes.

A group is one `celery worker` entry of the Procfile (`worker_general`): the
queues it consumes (`-Q`), the processes one worker of it may run (the MAX of
`--autoscale=MAX,MIN`, else `--concurrency`, else `BULWARK_WORKER_CONCURRENCY`)
and how many workers it may have (`BULWARK_FLEET_WORKERS`). A live worker
belongs to the group whose queues are exactly its own.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.procfile import read_procfile
from workers.settings import Settings

__all__ = ["WorkerGroup", "groups_from_procfile", "parse_worker_command", "read_groups"]


@dataclass(frozen=True, slots=True)
class WorkerGroup:
    """One Procfile worker entry, as the fleet scaler sees it."""

    name: str
    queues: tuple[str, ...]
    #: Processes one worker of the group may run.
    processes: int
    min_workers: int
    max_workers: int


def _option(args: Sequence[str], short: str | None, long: str) -> str | None:
    """The value of `-X VALUE`, `--long VALUE` or `--long=VALUE` in `args` (the last wins)."""
    found = None
    for i, arg in enumerate(args):
        if arg.startswith(long + "="):
            found = arg.split("=", 1)[1]
        elif arg in (long, short) and i + 1 < len(args):
            found = args[i + 1]
    return found


def parse_worker_command(
    command: str, default_processes: int
) -> tuple[tuple[str, ...], int] | None:
    """(queues, processes per worker) of a Procfile command; None if it runs no worker.

    Raises ValueError naming what is wrong in a worker command that cannot be read.
    """
    try:
        args = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"cannot split the command: {exc}") from None
    if "celery" not in args or "worker" not in args[args.index("celery") :]:
        return None
    raw_queues = _option(args, "-Q", "--queues")
    if not raw_queues:
        raise ValueError("a worker command without -Q QUEUES")
    queues = tuple(sorted({q.strip() for q in raw_queues.split(",") if q.strip()}))
    autoscale = _option(args, None, "--autoscale")
    concurrency = _option(args, "-c", "--concurrency")
    try:
        if autoscale is not None:
            processes = int(autoscale.split(",")[0])
        elif concurrency is not None:
            processes = int(concurrency)
        else:
            processes = default_processes
    except ValueError:
        raise ValueError(f"--autoscale {autoscale!r} / --concurrency {concurrency!r}") from None
    if processes < 1:
        raise ValueError(f"a worker of {processes} processes")
    return queues, processes


def groups_from_procfile(
    processes: Mapping[str, str],
    *,
    default_processes: int,
    bounds: Mapping[str, tuple[int, int]],
    default_bounds: tuple[int, int],
) -> tuple[WorkerGroup, ...]:
    """The worker groups of a Procfile's entries (`name -> command`).

    Raises ValueError naming the entry whose worker command cannot be read.
    """
    groups = []
    for name, command in processes.items():
        try:
            parsed = parse_worker_command(command, default_processes)
        except ValueError as exc:
            raise ValueError(f"Procfile entry {name}: {exc}") from None
        if parsed is None:
            continue
        low, high = bounds.get(name, default_bounds)
        groups.append(WorkerGroup(name, parsed[0], parsed[1], low, high))
    return tuple(groups)


def read_groups(settings: Settings) -> tuple[WorkerGroup, ...]:
    """The worker groups of the Procfile `BULWARK_PROCFILE` names (ProcfileError or
    ValueError naming what is wrong)."""
    s = settings.scaling
    return groups_from_procfile(
        read_procfile(Path(s.procfile)),
        default_processes=s.worker_concurrency,
        bounds=s.fleet_workers.of(),
        default_bounds=s.fleet_workers.default,
    )
