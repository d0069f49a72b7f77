"""How long a pool process waits between jobs: from one task's end (`task_postrun`) to its
next task's start (`task_prerun`), per process (per thread with `-P threads`).

Imported by the bench apps (`bench/bare.py`, `bench/benchtasks.py`); with
`BENCH_GAPS_DIR` set, each process writes its gaps there as it ends
(`worker_process_shutdown`, or the worker's own shutdown for a pool that does not
fork), one JSON list of seconds per file, for `bench/stack_overhead.py` to read.
With it unset, nothing is connected.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import signals

FOLDER = os.environ.get("BENCH_GAPS_DIR")

_local = threading.local()
_gaps: list[float] = []
_lock = threading.Lock()


def _started(**_: Any) -> None:
    ended = getattr(_local, "ended", None)
    if ended is not None:
        with _lock:
            _gaps.append(time.perf_counter() - ended)


def _ended(**_: Any) -> None:
    _local.ended = time.perf_counter()


def _write(**_: Any) -> None:
    if FOLDER is None or not _gaps:
        return
    with _lock:
        found = list(_gaps)
    Path(FOLDER, f"gaps-{os.getpid()}.json").write_text(json.dumps(found))


def read(folder: Path) -> list[float]:
    """Every gap the processes wrote to `folder`, in seconds."""
    return [gap for path in folder.glob("gaps-*.json") for gap in json.loads(path.read_text())]


if FOLDER is not None:
    signals.task_prerun.connect(_started, weak=False, dispatch_uid="bench.gaps.started")
    signals.task_postrun.connect(_ended, weak=False, dispatch_uid="bench.gaps.ended")
    signals.worker_process_shutdown.connect(_write, weak=False, dispatch_uid="bench.gaps.child")
    signals.worker_shutdown.connect(_write, weak=False, dispatch_uid="bench.gaps.worker")
