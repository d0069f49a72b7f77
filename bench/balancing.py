"""Load balancing: what the router costs per message, and how evenly a steady load spreads.

    .venv/bin/python bench/balancing.py [--rate 60] [--seconds 30] [--strategy least_backlog]

On a private redis-server:

1. the router's cost: `route_for` for a balanced task against a plain one, in µs per
   message, and the Redis commands it sent while routing (INFO commandstats: 0 wanted);
2. a steady load (`--rate` tasks/s of 50 ms for `--seconds` s) over four shard queues,
   one real worker of 2 processes each: each worker's utilisation (busy seconds over its
   capacity), the efficiency (least busy / busiest, goal > 95 %) and the spread of
   backlog across shards. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import balanced  # noqa: E402, F401  (declares bench.shard)
from bench.measure import commands  # noqa: E402
from policies import keys  # noqa: E402
from workers.celeryconfig import route_for  # noqa: E402
from workers.client import client as make_client  # noqa: E402
from workers.fleet import heartbeat_key  # noqa: E402
from workers.ops.embedded import EmbeddedRedis  # noqa: E402
from workers.security.keys import dev_keys  # noqa: E402
from workers.settings import get_settings  # noqa: E402

DONE = keys.key("bench", "shards", "done")


def router_cost(client: redis.Redis, n: int = 20_000) -> None:
    route = route_for(get_settings())
    route("bench.shard", [0], {}, {})  # starts the snapshot thread
    time.sleep(1.5)
    before = sum(commands(client).values())
    started = time.perf_counter()
    for i in range(n):
        route("bench.shard", [i], {}, {})
    balanced_us = (time.perf_counter() - started) / n * 1e6
    during = sum(commands(client).values()) - before
    started = time.perf_counter()
    for i in range(n):
        route("payments.charge", [i], {}, {})
    plain_us = (time.perf_counter() - started) / n * 1e6
    print(f"1. router: {balanced_us:.1f} µs a balanced message, {plain_us:.1f} µs a plain one; "
          f"{during} Redis commands over {n} balanced messages (the snapshot thread's "
          f"reads, about one round trip a second)")  # fmt: skip


def steady(url: str, workdir: Path, args: argparse.Namespace) -> None:
    client = redis.Redis.from_url(url)
    shards = [f"shard.{i}" for i in range(4)]
    workers = []
    for i, queue in enumerate(shards):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BULWARK_LOG_LEVEL": "warning",
               "BENCH_STRATEGY": args.strategy,
               "BENCH_SLEEP": "0.05"}  # fmt: skip
        host = f"shard{i}@bench"
        workers.append((host, subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.balanced", "worker", "-Q", queue,
             "-n", host, "-c", "2", "--without-mingle", "--without-gossip",
             "--loglevel=WARNING"],
            env=env, cwd=ROOT, stdout=(workdir / f"{host}.log").open("w"),
            stderr=subprocess.STDOUT)))  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not all(client.exists(heartbeat_key(h)) for h, _ in workers):
            if time.monotonic() > deadline:
                raise SystemExit(f"shard workers did not start; see {workdir}")
            time.sleep(0.1)
        producer = make_client()
        client.delete(DONE)
        spreads = []
        start, sent = time.monotonic(), 0
        while (now := time.monotonic()) < start + args.seconds:
            for _ in range(int((now - start) * args.rate) + 1 - sent):
                producer.send_task("bench.shard", args=[sent])
                sent += 1
            if int(now * 2) != int((now - 0.02) * 2):
                depths = [client.llen(s) for s in shards]
                if sum(depths):
                    spreads.append(statistics.pstdev(depths) / max(1e-9, statistics.mean(depths)))
            time.sleep(0.02)
        elapsed = time.monotonic() - start
        time.sleep(3)
        done = {k.decode(): int(v) for k, v in client.hgetall(DONE).items()}
    finally:
        for _, worker in workers:
            worker.terminate()
        for _, worker in workers:
            worker.wait(30)
    busy = {s: done.get(s, 0) * 0.05 for s in shards}
    utilisation = {s: b / (2 * elapsed) for s, b in busy.items()}
    efficiency = min(utilisation.values()) / max(max(utilisation.values()), 1e-9)
    print(f"2. steady load, {args.strategy}: {args.rate:g} tasks/s for {args.seconds:g} s, "
          f"{sent} sent")  # fmt: skip
    for s in shards:
        print(f"   {s}: {done.get(s, 0):5d} tasks, utilisation {utilisation[s]:.0%}")
    print(
        f"   efficiency (least busy / busiest) {efficiency:.0%}; backlog spread "
        f"(stdev / mean, when any waited) {statistics.mean(spreads) if spreads else 0:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=60.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--strategy", default="least_backlog",
                        choices=["least_backlog", "round_robin"])  # fmt: skip
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        assert server.dir is not None
        os.environ["REDIS_URL"] = server.url
        os.environ.update(dev_keys(server.dir / "keys").env("operator"))
        client = redis.Redis.from_url(server.url)
        router_cost(client)
        steady(server.url, server.dir, args)


if __name__ == "__main__":
    main()
