"""What a user pays for Bulwark over a bare Celery worker, layer by layer.

    .venv/bin/python bench/stack_overhead.py [--tasks 3000] [--rounds 2]
        [--pools prefork,threads] [--bodies noop,sleep] [--all-layers]

On a private redis-server, for each stack (interleaved, `--rounds` times): preload
`--tasks` tasks through the stack's producer, start a real worker, and time the
drain from its first task done to its last. The stacks, each adding to the one before:

  bare Celery                 bench/bare.py: Celery's defaults (early acks, prefetch 4,
                              no events, no result), importing nothing of Bulwark
  + acks late, prefetch 1     bench/layered.py with BENCH_LAYERS (the same bare app)
  + acks late, prefetch 4     the same, four messages reserved per process
  + task events
  + metrics                   Bulwark's Prometheus signal handlers and probe server
  + tracing                   OpenTelemetry spans, no exporter
  + tracing to OTLP           ... exported to a local OTLP/HTTP receiver
  + JSON logs at info         Bulwark's log lines, two per task at info
  Bulwark, plain task         workers.app as deployed (its consumer, transport, result
                              backend, audit, task events on demand, logs at info,
                              BULWARK_PREFETCH_MULTIPLIER=4 as for short jobs), security off
  + policies                  breaker + bulkhead (ResilientTask), security off
  + signed, verified          security on, as by default
  + encrypted                 BULWARK_ENCRYPT for the bench tasks

For each: tasks/s and the ratio to bare Celery; Redis commands and their time per task
(INFO commandstats: a script's commands count inside and outside it); CPU per task of
the worker's main process, its pool children and redis-server (/proc); RSS and USS per
worker process (USS: the pages that process alone holds, what one more pool process
costs; RSS adds every page it shares, the libraries' code included); the median wait
of a pool process between jobs (`bench/gaps.py`: from a task's end to the same process's
next task's start); under each table, where a pool process's RSS grew most against bare
Celery's, by mapping (a library's file, the heap, anonymous memory); enqueue rate of the
stack's producer (`send_task` of the bare app, `workers.client` for Bulwark) and its ratio.

Bodies: `noop` (one INCR) and `sleep` (10 ms, then one INCR: an I/O-bound job). Pools:
prefork -c 2 and threads -c 8. The layer rows run for prefork/noop; the other pool and
body pairs compare bare Celery with the Bulwark rows only (`--all-layers` for all).

Figures, not asserts: run it on a quiet machine and read them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gaps  # noqa: E402
from bench.benchtasks import DONE  # noqa: E402
from bench.measure import (  # noqa: E402
    children,
    commands,
    cpu_seconds,
    rss_by_mapping,
    rss_mib,
    uss_mib,
)
from workers.ops.embedded import EmbeddedRedis  # noqa: E402
from workers.security.keys import dev_keys  # noqa: E402

#: Variables a stack may set; each run starts from none of them.
STACK_VARIABLES = (
    "BULWARK_SECURITY", "BULWARK_ENCRYPT", "BENCH_LAYERS", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_TRACES_EXPORTER", "BULWARK_LOG_LEVEL", "BULWARK_PREFETCH_MULTIPLIER",
)  # fmt: skip
POOLS = {"prefork": ["-P", "prefork", "-c", "2"], "threads": ["-P", "threads", "-c", "8"]}
BODIES = {"noop": 1.0, "sleep": 0.25}  # share of --tasks: 10 ms tasks drain 40x slower


@dataclass(frozen=True)
class Stack:
    name: str
    module: str
    env: dict[str, str] = field(default_factory=dict)
    bulwark: bool = False  # produced through workers.client, run by the Bulwark app
    guarded: bool = False  # breaker + bulkhead
    layer: bool = False  # a layer row (prefork/noop only, unless --all-layers)

    def task(self, body: str) -> str:
        if self.guarded:
            return "bench.guarded" if body == "noop" else "bench.guarded_sleep"
        return "bench.plain" if body == "noop" else "bench.sleep"


def layered(name: str, layers: str, **env: str) -> Stack:
    return Stack(name, "bench.layered", {"BENCH_LAYERS": layers, **env}, layer=True)


#: Bulwark as the README advises for short jobs: logs at info, four messages reserved ahead.
INFO = {"BULWARK_LOG_LEVEL": "info", "BULWARK_PREFETCH_MULTIPLIER": "4"}
OTLP = {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}  # the local receiver's address, set at run time
STACKS = [
    Stack("bare Celery", "bench.bare"),
    layered("+ acks late, prefetch 1", "acks_late"),
    layered("+ acks late, prefetch 4", "acks_late", BENCH_PREFETCH="4"),
    layered("+ task events", "acks_late,events"),
    layered("+ metrics", "acks_late,events,metrics"),
    layered("+ tracing", "acks_late,events,metrics,tracing"),
    layered("+ tracing to OTLP", "acks_late,events,metrics,tracing", **OTLP),
    layered("+ JSON logs at info", "acks_late,events,metrics,tracing,logs", **OTLP, **INFO),
    Stack("Bulwark, plain task", "bench.benchtasks", {"BULWARK_SECURITY": "off", **INFO}, True),
    Stack("+ policies", "bench.benchtasks", {"BULWARK_SECURITY": "off", **INFO}, True, True),
    Stack("+ signed, verified", "bench.benchtasks", dict(INFO), True, True),
    Stack("+ encrypted", "bench.benchtasks", {"BULWARK_ENCRYPT": "bench.*", **INFO}, True, True),
]


# -- measuring ------------------------------------------------------------------------------------


def commandstats(client: redis.Redis) -> tuple[int, int]:
    """(calls, usec) of the commands redis-server ran so far, INFO itself left out.

    Both count a script's own commands once more inside its EVALSHA; redis-server's CPU
    (from /proc) is the figure that says what the server spent.
    """
    calls, usec = commands(client), commands(client, "usec")
    return sum(calls.values()) - calls.get("info", 0), sum(usec.values()) - usec.get("info", 0)


@dataclass
class Run:
    rate: float
    enqueue: float
    commands: float
    redis_usec: float
    cpu: dict[str, float]
    rss: tuple[float, float]
    uss: tuple[float, float]
    gap: float  # median seconds from a job's end to its process's next job's start
    mapped: dict[str, float]  # a pool process's RSS by mapping (MiB)


def enqueue(stack: Stack, body: str, n: int) -> float:
    """Send `n` tasks through the stack's producer; tasks a second. Runs in a process of its
    own (`--enqueue`), so that no producer's signal handlers reach another's sends."""
    if stack.bulwark:
        from workers.client import client  # lazy: the bare stacks import nothing of Bulwark

        app = client()
    else:
        from bench.bare import app  # lazy: it reads REDIS_URL at import

        app.conf.task_send_sent_event = "events" in stack.env.get("BENCH_LAYERS", "")
    task = stack.task(body)
    started = time.perf_counter()
    for i in range(n):
        app.send_task(task, args=[i], queue="default")
    return n / (time.perf_counter() - started)


def one_run(url: str, redis_pid: int, stack: Stack, pool: str, body: str, n: int,
            otlp: str, log: Path) -> Run:  # fmt: skip
    for name in STACK_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update({k: (otlp if k == "OTEL_EXPORTER_OTLP_ENDPOINT" else v)
                       for k, v in stack.env.items()})  # fmt: skip
    client = redis.Redis.from_url(url)
    client.flushall()
    sent = subprocess.run(
        [sys.executable, __file__, "--enqueue", str(STACKS.index(stack)), body, str(n)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    enqueued = float(sent.stdout.split()[-1])
    level = os.environ.get("BULWARK_LOG_LEVEL", "warning").upper()
    gaps_dir = Path(tempfile.mkdtemp(prefix="gaps-", dir=log.parent))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BULWARK_LOG_LEVEL": level.lower(),
           "BENCH_GAPS_DIR": str(gaps_dir)}  # fmt: skip
    command = [
        sys.executable, "-m", "celery", "-A", stack.module, "worker", "-Q", "default",
        "-n", "bench@local", *POOLS[pool], "--without-mingle", "--without-gossip",
        f"--loglevel={level}",
    ]  # fmt: skip
    with log.open("w") as out:
        worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while int(client.get(DONE) or 0) < 1:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{stack.name}: the worker ran nothing; see {log}")
            time.sleep(0.001)
        first, done_before = time.perf_counter(), int(client.get(DONE) or 0)
        calls0, usec0 = commandstats(client)
        pids = [worker.pid, *children(worker.pid)]
        cpu0 = [cpu_seconds(p) for p in pids], cpu_seconds(redis_pid)
        while (done := int(client.get(DONE) or 0)) < n:
            if worker.poll() is not None or time.monotonic() > deadline + 600:
                raise SystemExit(f"{stack.name}: the worker stopped at {done}/{n}; see {log}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - first
        calls1, usec1 = commandstats(client)
        cpu1 = [cpu_seconds(p) for p in pids], cpu_seconds(redis_pid)
        rss = [rss_mib(p) for p in pids]
        uss = [uss_mib(p) for p in pids]
        mapped = rss_by_mapping(pids[-1])  # a pool process (the worker itself with threads)
    finally:
        worker.terminate()
        worker.wait(30)
    ran = done - done_before
    per_task = 1e6 / ran
    waits = gaps.read(gaps_dir)
    main = (cpu1[0][0] - cpu0[0][0]) * per_task
    kids = sum(b - a for a, b in zip(cpu0[0][1:], cpu1[0][1:], strict=True)) * per_task
    return Run(
        rate=ran / elapsed,
        enqueue=enqueued,
        commands=(calls1 - calls0) / ran,
        redis_usec=(usec1 - usec0) / ran,
        cpu={"main": main, "children": kids, "redis": (cpu1[1] - cpu0[1]) * per_task},
        rss=(rss[0], statistics.mean(rss[1:]) if len(rss) > 1 else 0.0),
        uss=(uss[0], statistics.mean(uss[1:]) if len(uss) > 1 else 0.0),
        gap=statistics.median(waits) if waits else float("nan"),
        mapped=mapped,
    )


@contextmanager
def otlp_receiver() -> Iterator[str]:
    """A local OTLP/HTTP endpoint that takes every export (and keeps nothing)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# -- report ---------------------------------------------------------------------------------------


def _memory(runs: list[Run], field: str) -> tuple[float, float, str]:
    """(main, per pool process, shown) medians of `rss` or `uss`; a process with no pool
    children (threads) counts as its own pool process."""
    main = statistics.median(getattr(r, field)[0] for r in runs)
    child = statistics.median(getattr(r, field)[1] for r in runs)
    return main, child or main, f"{main:.0f}/{child:.0f}" if child else f"{main:.0f}"


def _memory_by_mapping(bare: Run, other: Run, name: str) -> None:
    """Where a pool process's RSS differs most between bare Celery and `name` (last round)."""
    keys = set(bare.mapped) | set(other.mapped)
    grown = sorted(keys, key=lambda k: other.mapped.get(k, 0.0) - bare.mapped.get(k, 0.0))
    shown = ", ".join(f"{k} {other.mapped.get(k, 0.0) - bare.mapped.get(k, 0.0):+.1f}"
                      for k in reversed(grown[-5:]))  # fmt: skip
    print(f"pool process RSS, {name} against bare Celery, by mapping (MiB): {shown}")


def report(pool: str, body: str, n: int, results: dict[str, list[Run]]) -> None:
    bare = results["bare Celery"]
    bare_rate = statistics.median(r.rate for r in bare)
    bare_enqueue = statistics.median(r.enqueue for r in bare)
    bare_rss, bare_uss = _memory(bare, "rss")[1], _memory(bare, "uss")[1]
    print(f"\n{pool}, {body} tasks ({n} a round, median of {len(bare)} rounds)")
    print(f"{'stack':26} {'tasks/s':>8} {'ratio':>6} {'cmds':>5} {'cmd us':>8} "
          f"{'cpu us/task main+pool+redis':>28} {'RSS MiB':>9} {'rss x':>6} "
          f"{'USS MiB':>9} {'uss x':>6} {'gap ms':>6} {'enqueue/s':>9} {'ratio':>6}")  # fmt: skip
    for name, runs in results.items():
        rate = statistics.median(r.rate for r in runs)
        enqueue = statistics.median(r.enqueue for r in runs)
        cpu = {k: statistics.median(r.cpu[k] for r in runs) for k in runs[0].cpu}
        _, rss, shown_rss = _memory(runs, "rss")
        _, uss, shown_uss = _memory(runs, "uss")
        shown_cpu = f"{cpu['main']:.0f}+{cpu['children']:.0f}+{cpu['redis']:.0f}"
        print(f"{name:26} {rate:8.0f} {rate / bare_rate:6.2f} "
              f"{statistics.median(r.commands for r in runs):5.1f} "
              f"{statistics.median(r.redis_usec for r in runs):8.1f} {shown_cpu:>28} "
              f"{shown_rss:>9} {rss / bare_rss:6.2f} {shown_uss:>9} {uss / bare_uss:6.2f} "
              f"{statistics.median(r.gap for r in runs) * 1e3:6.2f} "
              f"{enqueue:9.0f} {enqueue / bare_enqueue:6.2f}")  # fmt: skip
    last = list(results)[-1]
    _memory_by_mapping(bare[-1], results[last][-1], last)
    plain, guarded = results.get("Bulwark, plain task"), results.get("+ policies")
    if plain and guarded:
        ratio = statistics.median(r.rate for r in guarded) / statistics.median(
            r.rate for r in plain
        )
        print(f"policies alone: {ratio:.2f} of the Bulwark app without them (target 0.95)")


def main() -> None:
    if sys.argv[1:2] == ["--enqueue"]:
        index, body, n = sys.argv[2:5]
        print(f"{enqueue(STACKS[int(index)], body, int(n)):.1f}")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pools", default="prefork,threads")
    parser.add_argument("--bodies", default="noop,sleep")
    parser.add_argument("--all-layers", action="store_true")
    parser.add_argument("--only", default="", help="stack names to run, separated by '|'")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bulwark-bench-stack-"))
    # Security on, as by default: the bench signs as a producer the dev trust store allows
    # (the worker identity may send anything); stacks that turn it off say so.
    os.environ.update(dev_keys(folder / "keys").env("worker"))
    server = EmbeddedRedis().start()
    assert server.process is not None
    os.environ["REDIS_URL"] = server.url  # the client too: never the developer's Redis
    os.environ["BENCH_DONE_KEY"] = DONE  # what bench/bare.py counts in
    only = {s.strip() for s in args.only.split("|") if s.strip()}
    try:
        with otlp_receiver() as otlp:
            for pool in args.pools.split(","):
                for body in args.bodies.split(","):
                    stacks = [s for s in STACKS if (not s.layer or args.all_layers
                              or (pool, body) == ("prefork", "noop"))]  # fmt: skip
                    stacks = [s for s in stacks if not only or s.name in only or s is STACKS[0]]
                    n = max(200, int(args.tasks * BODIES[body]))
                    results: dict[str, list[Run]] = {s.name: [] for s in stacks}
                    for round_ in range(args.rounds):
                        for stack in stacks:
                            found = one_run(server.url, server.process.pid, stack, pool, body,
                                            n, otlp, folder / "worker.log")  # fmt: skip
                            results[stack.name].append(found)
                            print(f"  {pool}/{body} round {round_ + 1} {stack.name:26} "
                                  f"{found.rate:7.0f} tasks/s", flush=True)  # fmt: skip
                    report(pool, body, n, results)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
