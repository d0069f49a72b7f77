"""A load step against the pool autoscaler: Bulwark's, and Celery's stock one, in one run.

    .venv/bin/python bench/autoscale.py [--rate 12] [--seconds 60] [--latency 0.3] [--max 8]

On a private redis-server, one real worker consumes the inventory queue (the demo
gateway: each call sleeps `--latency` s) with `--autoscale=MAX,1`. From idle, a
producer sends `--rate` tasks a second for `--seconds` s, then stops. Every 0.25 s
the bench samples the pool (the worker's live children in /proc) and the backlog.
Printed per autoscaler:

- response: seconds from the step until the pool first reaches the size the load
  needs (rate x latency / 0.75, rounded up: the specification's 70-80 % utilisation);
- drain: seconds from the end of the step until every task has run;
- utilisation over the second half of the step: busy process-seconds (tasks done x
  latency) over the pool's process-seconds (goal 70-80 %);
- the largest pool, and the mean pool over that half;
- then a 20 s step with the dependency's breaker forced open: the largest pool;
- then the step on a fleet run by `bulwark up` (a worker group of 2 processes a worker,
  beat deciding every 15 s): seconds until beat wants the workers the load needs,
  until they run, the drain, and the utilisation (`--fleet-only`: just this).

Both workers run the same app, settings and tasks; only `worker_autoscaler` differs
(`bench.stock_autoscale` puts Celery's back). Figures, not asserts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import children  # noqa: E402
from policies.breaker import BreakerConfig, CircuitBreaker, RedisBreakerStore  # noqa: E402
from tasks.dependencies import dependency  # noqa: E402
from workers.client import client as make_client  # noqa: E402
from workers.fleet import WORKERS_INDEX, heartbeat_key  # noqa: E402
from workers.ops.embedded import EmbeddedRedis  # noqa: E402
from workers.scaling.fleet import DECISIONS_KEY  # noqa: E402
from workers.security.keys import dev_keys  # noqa: E402

CALLS = "bulwark:{demo:inventory}:calls"
APPS = (("bulwark", "workers.app"), ("stock", "bench.stock_autoscale"))
TARGET_UTILISATION = 0.75


@dataclass
class Result:
    name: str
    needed: int
    response: float | None
    drain: float | None
    utilisation: float
    largest: int
    mean_pool: float


def live(pids: list[int]) -> int:
    alive = 0
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        alive += state != "Z"
    return alive


def run(name: str, app_module: str, url: str, workdir: Path, args: argparse.Namespace,
        *, seconds: float, breaker_open: bool = False) -> Result:  # fmt: skip
    client = redis.Redis.from_url(url)
    client.flushall()
    dependency("inventory").set_latency(args.latency)
    if breaker_open:  # the dependency is down: more processes would only defer faster
        CircuitBreaker("inventory", BreakerConfig(), RedisBreakerStore(client)).force_open()
    host = f"{name}@bench"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BULWARK_LOG_LEVEL": "warning"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", app_module, "worker", "-Q", "inventory",
         "-n", host, f"--autoscale={args.max},1", "--without-mingle", "--without-gossip",
         "--loglevel=WARNING"],
        env=env, cwd=ROOT, stdout=(workdir / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not client.exists(heartbeat_key(host)):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(f"{name} worker did not start; see {workdir / name}.log")
            time.sleep(0.05)
        time.sleep(2.0)  # idle before the step, as a pool at rest
        needed = math.ceil(args.rate * args.latency / TARGET_UTILISATION)
        samples: list[tuple[float, int, int]] = []  # (t, pool, calls)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                at = time.monotonic()
                samples.append((at, live(children(worker.pid)), int(client.get(CALLS) or 0)))
                stop.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        producer = make_client()
        start = time.monotonic()
        sampler.start()
        sent = 0
        while (now := time.monotonic()) < start + seconds:
            due = int((now - start) * args.rate) + 1
            for _ in range(due - sent):
                producer.send_task("inventory.reserve", args=[f"sku-{sent % 50}", 1])
                sent += 1
            time.sleep(0.02)
        end = time.monotonic()
        while not breaker_open and int(client.get(CALLS) or 0) < sent:
            if time.monotonic() > end + 300:
                break
            time.sleep(0.1)
        drained = time.monotonic()
        stop.set()
        sampler.join()
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
    done = int(client.get(CALLS) or 0)
    reached = next((t - start for t, pool, _ in samples if pool >= needed), None)
    half = [(t, pool, calls) for t, pool, calls in samples if start + seconds / 2 <= t <= end]
    process_seconds = sum(a[1] * (b[0] - a[0]) for a, b in itertools.pairwise(half))
    busy = (half[-1][2] - half[0][2]) * args.latency if len(half) > 1 else 0.0
    return Result(
        name=name,
        needed=needed,
        response=reached,
        drain=drained - end if done >= sent and not breaker_open else None,
        utilisation=busy / process_seconds if process_seconds else 0.0,
        largest=max((pool for _, pool, _ in samples), default=0),
        mean_pool=process_seconds / (half[-1][0] - half[0][0]) if len(half) > 1 else 0.0,
    )


FLEET_PROCFILE = """\
worker_inventory: env BULWARK_HTTP_PORT=0 celery -A workers.app --quiet worker --loglevel=warning -Q inventory -n inventory@%h --autoscale={max},1 --without-mingle --without-gossip
beat: env BULWARK_HTTP_PORT=0 celery -A workers.app --quiet beat --loglevel=warning --schedule=${{BULWARK_STATE_DIR}}/beat-schedule
"""  # noqa: E501 (Procfile lines)


def fleet_step(url: str, workdir: Path, args: argparse.Namespace, per_worker: int) -> str:
    """The same step on a fleet run by `bulwark up` (beat's decisions every 15 s, extra
    workers of `per_worker` processes): when beat wants enough workers, when they run."""
    client = redis.Redis.from_url(url)
    client.flushall()
    dependency("inventory").set_latency(args.latency)
    procfile = workdir / "Procfile"
    procfile.write_text(FLEET_PROCFILE.format(max=per_worker))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BULWARK_FLEET_WORKERS": "1..8"}
    up = subprocess.Popen(
        [sys.executable, "-m", "workers.ops.cli", "up", "--procfile", str(procfile)],
        env=env, cwd=ROOT, stdout=(workdir / "up.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    needed = math.ceil(math.ceil(args.rate * args.latency / TARGET_UTILISATION) / per_worker)

    def workers() -> tuple[int, int]:
        """(live inventory workers, their pool processes)"""
        count = processes = 0
        for name in client.smembers(WORKERS_INDEX):
            raw = client.get(heartbeat_key(name.decode()))
            if raw and name.startswith(b"inventory"):
                count += 1
                processes += (json.loads(raw).get("pool") or {}).get("processes", 1)
        return count, processes

    def desired() -> int:
        raw = client.hget(DECISIONS_KEY, "worker_inventory")
        return int(json.loads(raw)["desired"]) if raw else 0

    try:
        deadline = time.monotonic() + 60
        while workers()[0] < 1:
            if time.monotonic() > deadline:
                raise SystemExit(f"the fleet did not start; see {workdir / 'up.log'}")
            time.sleep(0.2)
        time.sleep(2.0)
        producer = make_client()
        start, sent = time.monotonic(), 0
        decided = running = None
        largest = 0
        samples: list[tuple[float, int, int]] = []  # (t, processes, calls)
        while (now := time.monotonic()) < start + args.seconds:
            for _ in range(int((now - start) * args.rate) + 1 - sent):
                producer.send_task("inventory.reserve", args=[f"sku-{sent % 50}", 1])
                sent += 1
            if int(now * 2) != int((now - 0.02) * 2):  # twice a second
                count, processes = workers()
                largest = max(largest, count)
                if decided is None and desired() >= needed:
                    decided = now - start
                if running is None and count >= needed:
                    running = now - start
                samples.append((now, processes, int(client.get(CALLS) or 0)))
            time.sleep(0.02)
        end = time.monotonic()
        while int(client.get(CALLS) or 0) < sent and time.monotonic() < end + 300:
            time.sleep(0.1)
        drained = time.monotonic() - end
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)
    half = [x for x in samples if x[0] >= start + args.seconds / 2]
    process_seconds = sum(a[1] * (b[0] - a[0]) for a, b in itertools.pairwise(half))
    busy = (half[-1][2] - half[0][2]) * args.latency if len(half) > 1 else 0.0
    say = lambda t: f"{t:.1f} s" if t is not None else "never"  # noqa: E731
    return (f"fleet (bulwark up, workers of --autoscale={per_worker},1, beat every 15 s): the "
            f"load needs {needed} workers; beat wanted them after {say(decided)}, they ran "
            f"after {say(running)}; at most {largest} ran; drained {drained:.1f} s after the "
            f"step; utilisation "
            f"{busy / process_seconds if process_seconds else 0:.0%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=12.0, help="tasks a second in the step")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the step")
    parser.add_argument("--latency", type=float, default=0.3, help="seconds per task")
    parser.add_argument("--max", type=int, default=8, help="MAX of --autoscale=MAX,1")
    parser.add_argument("--fleet-only", action="store_true", help="only the fleet step")
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        assert server.dir is not None
        os.environ["REDIS_URL"] = server.url
        os.environ.update(dev_keys(server.dir / "keys").env("operator"))
        if args.fleet_only:
            print(fleet_step(server.url, server.dir, args, per_worker=2))
            return
        steady = [
            run(name, module, server.url, server.dir, args, seconds=args.seconds)
            for name, module in APPS
        ]
        held = [
            run(name, module, server.url, server.dir, args, seconds=20.0, breaker_open=True)
            for name, module in APPS
        ]
        fleet = fleet_step(server.url, server.dir, args, per_worker=2)
    print(f"load step: {args.rate:g} tasks/s of {args.latency * 1000:.0f} ms for "
          f"{args.seconds:g} s, --autoscale={args.max},1; the load needs "
          f"{steady[0].needed} processes at {TARGET_UTILISATION:.0%}")  # fmt: skip
    print(f"{'autoscaler':12} {'response':>10} {'drain':>8} {'utilisation':>12} "
          f"{'largest':>8} {'mean pool':>10}")  # fmt: skip
    for r in steady:
        response = f"{r.response:.1f} s" if r.response is not None else "never"
        drain = f"{r.drain:.1f} s" if r.drain is not None else "> 300 s"
        print(f"{r.name:12} {response:>10} {drain:>8} {r.utilisation:>12.0%} "
              f"{r.largest:>8} {r.mean_pool:>10.1f}")  # fmt: skip
    print("the same step for 20 s with the inventory breaker forced open (tasks deferred):")
    for r in held:
        print(f"{r.name:12} largest pool {r.largest}, mean {r.mean_pool:.1f}")
    print(fleet)


if __name__ == "__main__":
    main()
