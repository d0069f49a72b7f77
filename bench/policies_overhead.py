"""What the shared policies cost, against plain Celery in the same run.

    .venv/bin/python bench/policies_overhead.py [--tasks 2000] [--rounds 3] [--watchers 32]

Prints, on a private redis-server and a real prefork worker:

1. throughput of a no-op task, plain vs through breaker + bulkhead
   (`ResilientTask`), and their ratio (target >= 0.9);
2. Redis commands per task that the policies add (INFO commandstats);
3. network round trips per call on the policy client (counted on the
   connection, in-process, on the production code path; target <= 2);
4. breaker-open propagation latency to 1 and to `--watchers` (32) other processes
   (pub/sub invalidation of the local cache; target p99 <= 100 ms);
5. redis-server CPU and commands per guarded task with 2 worker processes and
   with 32 (target: flat, within 10 %); and with 2 processes whose calls come as far
   apart as each of the 32's did (tasks sent at that pace): what a task costs Redis
   follows how often one process calls, not how many processes there are.

Figures, not asserts: run it on a quiet machine and read them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import commands, cpu_seconds  # noqa: E402
from policies import keys  # noqa: E402
from policies.breaker import BreakerConfig, CircuitBreaker, RedisBreakerStore  # noqa: E402
from policies.bulkhead import Bulkhead, BulkheadConfig  # noqa: E402
from policies.errors import CircuitOpen  # noqa: E402
from policies.retry import RetryPolicy  # noqa: E402
from policies.watch import feed_for  # noqa: E402
from workers.client import client as make_client  # noqa: E402
from workers.guard import Guard  # noqa: E402
from workers.held import Held  # noqa: E402
from workers.ops.embedded import EmbeddedRedis  # noqa: E402
from workers.security.keys import dev_keys  # noqa: E402

DONE = keys.key("bench", "tasks", "done")
HOST = "bench@local"


# -- 1 and 2: throughput and commands per task through a real worker --------------------------


def start_worker(url: str, log: Path, host: str = HOST, concurrency: int = 2,
                 queue: str = "alerts") -> subprocess.Popen[bytes]:  # fmt: skip
    env = {
        **os.environ,
        "REDIS_URL": url,
        "PYTHONPATH": str(ROOT),
        "BULWARK_LOG_LEVEL": "warning",
    }
    command = [
        sys.executable, "-m", "celery", "-A", "bench.benchtasks", "worker",
        "-Q", queue, "-n", host, "-c", str(concurrency), "--without-mingle",
        "--without-gossip", "--loglevel=WARNING",
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


@dataclass
class Run:
    """One drain: its rate, the commands Redis ran (calls and usec), its CPU per task."""

    rate: float
    calls: dict[str, int]
    usec: dict[str, int]
    redis_cpu: float  # redis-server process CPU per task, seconds


def one_run(app: Any, client: redis.Redis, task: str, n: int, redis_pid: int) -> Run:
    """Fill the queue with `n` tasks, let the worker drain it."""
    client.delete(DONE)
    for i in range(n):
        app.send_task(task, args=[i], queue="default")
    client.config_resetstat()
    cpu = cpu_seconds(redis_pid)
    started = time.perf_counter()
    app.control.add_consumer("default", destination=[HOST], reply=True, timeout=5)
    while int(client.get(DONE) or 0) < n:
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(redis_pid) - cpu
    calls, usec = commands(client), commands(client, "usec")
    app.control.cancel_consumer("default", destination=[HOST], reply=True, timeout=5)
    return Run(n / elapsed, calls, usec, cpu / n)


def throughput(url: str, redis_pid: int, n: int, rounds: int, workdir: Path) -> None:
    os.environ["REDIS_URL"] = url
    # Security on, as by default: the bench (and its worker) sign as the operator, who may
    # also send the add_consumer/cancel_consumer commands that start and stop each drain.
    os.environ.update(dev_keys(workdir / "keys").env("operator"))
    app = make_client()
    client = redis.Redis.from_url(url)
    worker = start_worker(url, workdir / "worker.log")
    try:
        deadline = time.monotonic() + 30
        while not client.exists(keys.key("worker", HOST, "heartbeat")):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("bench worker did not start; see " + str(workdir / "worker.log"))
            time.sleep(0.05)
        one_run(app, client, "bench.guarded", 200, redis_pid)  # warm up: scripts, caches
        one_run(app, client, "bench.plain", 200, redis_pid)
        runs: dict[str, list[Run]] = {"bench.plain": [], "bench.guarded": []}
        for _ in range(rounds):
            for task in ("bench.plain", "bench.guarded"):
                runs[task].append(one_run(app, client, task, n, redis_pid))
    finally:
        worker.terminate()
        worker.wait(20)
    rates = {task: [run.rate for run in done] for task, done in runs.items()}
    used = {task: done[-1].calls for task, done in runs.items()}
    plain = statistics.median(rates["bench.plain"])
    guarded = statistics.median(rates["bench.guarded"])
    print(f"1. throughput, {n} no-op tasks x {rounds} rounds, prefork -c 2 (median):")
    print(f"   plain Celery            {plain:8.0f} tasks/s   {_runs(rates['bench.plain'])}")
    print(f"   breaker + bulkhead      {guarded:8.0f} tasks/s   {_runs(rates['bench.guarded'])}")
    print(f"   ratio                   {guarded / plain:8.2f}   (target >= 0.9)")
    print("2. Redis commands per task, last round (INFO commandstats):")
    names = sorted(set(used["bench.plain"]) | set(used["bench.guarded"]))
    added_total = 0.0
    for name in names:
        p = used["bench.plain"].get(name, 0) / n
        g = used["bench.guarded"].get(name, 0) / n
        if abs(g - p) >= 0.05 or name in ("evalsha", "eval"):
            print(f"   {name:22} plain {p:6.2f}   guarded {g:6.2f}   added {g - p:+6.2f}")
        added_total += g - p
    print(f"   {'all commands':22} added per task {added_total:+.2f}")
    cpu = {
        task: statistics.median(run.redis_cpu for run in done) * 1e6 for task, done in runs.items()
    }
    scripts = {task: sum(r.usec.get("evalsha", 0) for r in done) / (n * rounds)
               for task, done in runs.items()}  # fmt: skip
    added_cpu = cpu["bench.guarded"] - cpu["bench.plain"]
    print(
        "   redis-server CPU per task (median)      plain {:5.0f} us   guarded {:5.0f} us   "
        "added {:+4.0f} us".format(cpu["bench.plain"], cpu["bench.guarded"], added_cpu)
    )
    print(
        "   in the policies' scripts (EVALSHA usec)                          added {:+4.0f} us"
        "   (target <= 40)".format(scripts["bench.guarded"] - scripts["bench.plain"])
    )


def _runs(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.0f}" for v in values) + ")"


# -- 3: round trips per call on the production code path --------------------------------------


class CountingConnection(redis.Connection):
    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


class _Request:
    called_directly = True
    id = "bench"
    headers: ClassVar[dict[str, Any]] = {}


class _Task:
    """The attributes `Guard.run` reads from a Celery task."""

    name = "bench.guarded"
    fallback = None
    request = _Request()

    def run(self, i: int) -> int:
        return i

    def header(self, name: str, default: int = 0) -> int:
        return default


def round_trips(url: str, calls: int = 2000) -> None:
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    print("3. round trips per call on the policy client (breaker + bulkhead, closed, happy path):")
    alone, seconds = guarded_round_trips(client, calls)
    print(
        f"   a call on its own      {alone:.2f} round trips   (target <= 2: one before, one after)"
    )
    print(f"   {seconds * 1e6:.0f} us per call in-process, policies only")
    busy, seconds = guarded_round_trips(client, calls, held=True)
    print(f"   back to back           {busy:.2f} round trips   (the lease taken over, the outcomes "
          "sent together: workers.held)")  # fmt: skip
    print(f"   {seconds * 1e6:.0f} us per call in-process, policies only")


def guarded_round_trips(
    client: redis.Redis, calls: int = 2000, *, held: bool = False
) -> tuple[float, float]:
    """(round trips, seconds) per guarded call (breaker + bulkhead) through `client`, whose
    connections are `CountingConnection`s. `held`: as in a worker, whose calls back to back
    hold their outcomes and take over their lease (`workers.held`); the last ones sent too."""

    breaker = CircuitBreaker("rt", BreakerConfig(), RedisBreakerStore(client))
    bulkhead = Bulkhead("rt", client, BulkheadConfig(limit=10))
    guard = Guard(
        breaker=breaker,
        bulkhead=bulkhead,
        service=None,
        budget=None,
        retry=RetryPolicy.from_settings(),
        defer_max=10,
        defer_cap=60.0,
        client=client,
        held=Held(client) if held else None,
    )
    task = _Task()
    for i in range(50):  # warm up: scripts loaded, change feed subscribed, cache filled
        guard.run(task, (i,), {})  # type: ignore[arg-type]
    feed_for(client).wait_healthy(5)
    guard.run(task, (0,), {})  # type: ignore[arg-type]
    before = CountingConnection.sent
    started = time.perf_counter()
    for i in range(calls):
        guard.run(task, (i,), {})  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    if guard.held is not None:
        guard.held.send()
    return (CountingConnection.sent - before) / calls, elapsed / calls


# -- 4: breaker-open propagation to other processes ----------------------------------------------


def _watcher(url: str, conn: Any) -> None:

    client = redis.Redis.from_url(url)
    breaker = CircuitBreaker("propagation", BreakerConfig(), RedisBreakerStore(client))
    breaker.acquire()
    feed_for(client).wait_healthy(5)
    while True:
        message = conn.recv()
        if message == "stop":
            return
        # Wait until this process admits from its cache again (closed), then report ready.
        while True:
            try:
                breaker.acquire()
                break
            except CircuitOpen:
                time.sleep(0.001)
        conn.send("ready")
        # A task every millisecond: no round trip while the cache says closed.
        while True:
            try:
                breaker.acquire()
            except CircuitOpen:
                conn.send(time.time())
                break
            time.sleep(0.001)


def propagation(url: str, trials: int, watchers: int) -> None:

    client = redis.Redis.from_url(url)
    breaker = CircuitBreaker("propagation", BreakerConfig(), RedisBreakerStore(client))
    ctx = mp.get_context("spawn")
    pipes = []
    for _ in range(watchers):
        here, there = ctx.Pipe()
        ctx.Process(target=_watcher, args=(url, there), daemon=True).start()
        pipes.append(here)
    latencies = []
    for _ in range(trials):
        breaker.reset()
        for here in pipes:
            here.send("go")
        for here in pipes:
            assert here.recv() == "ready"
        time.sleep(0.002)
        breaker.force_open()
        opened = time.time()
        latencies += [(here.recv() - opened) * 1000 for here in pipes]
    for here in pipes:
        here.send("stop")
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[max(int(len(latencies) * 0.99) - 1, 0)]
    others = f"{watchers} other process" + ("es" if watchers > 1 else "")
    print(f"4. breaker-open propagation to {others} (each admitting a call a millisecond "
          f"from its cache), {trials} trials:")  # fmt: skip
    print(
        f"   p50 {p50:.2f} ms   p99 {p99:.2f} ms   max {latencies[-1]:.2f} ms   (target p99 <= 100)"
    )


# -- 5: Redis server CPU per task, 2 worker processes against 32 --------------------------------


def _drain(url: str, redis_pid: int, workdir: Path, workers: int, concurrency: int,
           n: int, pace: float | None = None) -> tuple[float, ...]:  # fmt: skip
    """Run `n` guarded tasks on `workers` workers of `concurrency` processes: queued before
    they start, or with `pace`, sent one at a time at that rate once they run. (tasks a
    second; per task: redis-server CPU seconds, commands, the policies' scripts (EVALSHA
    calls and their usec)) from the first done to the last."""
    app = make_client()
    client = redis.Redis.from_url(url)
    client.delete(DONE)
    if pace is None:
        for i in range(n):
            app.send_task("bench.guarded", args=[i], queue="default")
    started = [
        start_worker(url, workdir / f"scale-{w}.log", f"scale{w}@local", concurrency, "default")
        for w in range(workers)
    ]
    try:
        if pace is not None:
            app.send_task("bench.guarded", args=[0], queue="default")
        while int(client.get(DONE) or 0) < 1:
            time.sleep(0.002)
        calls0, usec0 = commands(client), commands(client, "usec")
        cpu0, done0, t0 = cpu_seconds(redis_pid), int(client.get(DONE) or 0), time.perf_counter()
        if pace is not None:
            for i in range(1, n):
                time.sleep(max(0.0, t0 + i / pace - time.perf_counter()))
                app.send_task("bench.guarded", args=[i], queue="default")
        while (done := int(client.get(DONE) or 0)) < n:
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        calls1, usec1 = commands(client), commands(client, "usec")
        cpu1 = cpu_seconds(redis_pid)
    finally:
        for worker in started:
            worker.terminate()
        for worker in started:
            worker.wait(30)
    ran = done - done0
    scripts = calls1.get("evalsha", 0) - calls0.get("evalsha", 0)
    script_usec = usec1.get("evalsha", 0) - usec0.get("evalsha", 0)
    commanded = sum(calls1.values()) - sum(calls0.values())
    return ran / elapsed, (cpu1 - cpu0) / ran, commanded / ran, scripts / ran, script_usec / ran


def scale(url: str, redis_pid: int, n: int, workdir: Path) -> None:
    """Drain `n` guarded tasks with 2 worker processes, then with 32 (4 workers of 8); then
    2 processes again, with the tasks sent at the pace each of the 32 saw its calls."""
    print("5. Redis per guarded task, 2 worker processes against 32 (one breaker, one bulkhead):")
    alone = _drain(url, redis_pid, workdir, 1, 2, n)
    many = _drain(url, redis_pid, workdir, 4, 8, n)
    pace = many[0] * 2 / 32  # each of 2 processes calls as often as each of the 32 did
    paced = _drain(url, redis_pid, workdir, 1, 2, max(100, int(pace * 10)), pace)
    for label, (rate, cpu, calls, scripts, script_usec) in (
        ("2 processes", alone), ("32 processes", many), ("2 processes, paced", paced)
    ):  # fmt: skip
        print(f"   {label:20} {rate:6.0f} tasks/s, redis-server CPU {cpu * 1e6:4.0f} us/task, "
              f"{calls:5.1f} commands/task, scripts {scripts:4.2f}/task "
              f"{script_usec:5.1f} us")  # fmt: skip
    print(
        "   (a script's commands count inside and outside it; paced: with 2 processes, each "
        "one's calls as far apart as each of the 32's were)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--watchers", type=int, default=32, help="processes told of an open")
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        assert server.dir is not None and server.process is not None
        throughput(server.url, server.process.pid, args.tasks, args.rounds, server.dir)
        round_trips(server.url)
        propagation(server.url, args.trials, 1)
        propagation(server.url, args.trials, args.watchers)
        scale(server.url, server.process.pid, args.tasks, server.dir)


if __name__ == "__main__":
    main()
