"""The fleet on each engine, against the single-Redis fleet, in one run; and failovers.

    .venv/bin/python bench/backends.py [--tasks 2000] [--rounds 2] [--failover]

For each backend (interleaved, `--rounds` times): preload `--tasks` guarded no-op tasks
(breaker + bulkhead, security on) through `workers.client`, start a real worker
(prefork -c 2) and time the drain from its first task done to its last. Backends:

  redis      one redis-server: policies, broker and results (the reference)
  cluster    policies on a Redis Cluster (3 masters + 3 replicas), broker on one Redis
  sentinel   policies, broker and results on a master + replica behind 3 sentinels
  rabbitmq   broker on RabbitMQ (a vhost of its own, quorum queues), policies on Redis

For each: tasks/s and the ratio to `redis`; policy store commands and Redis server
time per task (INFO commandstats, summed over the cluster's masters; a script's
commands count inside and outside it); round trips per guarded call on the policy
client, in-process (a Sentinel client's connections cannot be counted: it talks to one
master, as `redis` does).

`--failover` then: 400 10 ms tasks sent, and after 100 are done the cluster master that
serves the breaker, the sentinels' master, or the RabbitMQ node that leads the quorum
queue (a cluster of three nodes of the bench's own, the broker URL naming them all)
SIGKILLed; prints the longest gap between two task completions (the unavailability a
caller sees) and the tasks lost (goal 0).

Figures, not asserts: run it on a quiet machine and read them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.benchtasks import DONE, FINISHED  # noqa: E402
from bench.measure import commands  # noqa: E402
from bench.policies_overhead import CountingConnection, guarded_round_trips  # noqa: E402
from policies import keys  # noqa: E402
from tests.topologies import Cluster, RabbitCluster, RabbitVhost, Sentinels  # noqa: E402
from workers import resources, settings  # noqa: E402
from workers.client import client  # noqa: E402
from workers.ops.embedded import EmbeddedRedis  # noqa: E402
from workers.security.keys import dev_keys  # noqa: E402
from workers.stores import connect  # noqa: E402


@contextmanager
def backend(name: str, reference: EmbeddedRedis) -> Iterator[tuple[dict[str, str], list[int]]]:
    """The environment of a backend, and the ports of its policy store's masters."""
    if name == "redis":
        yield {"REDIS_URL": reference.url}, [reference.port]
    elif name == "cluster":
        cluster = Cluster(masters=3, replicas=1).start()
        try:
            masters = [n.port for n in cluster.nodes[:3]]
            yield {"REDIS_URL": cluster.url, "CELERY_BROKER_URL": reference.url,
                   "CELERY_RESULT_BACKEND": reference.url}, masters  # fmt: skip
        finally:
            cluster.stop()
    elif name == "sentinel":
        group = Sentinels().start()
        try:
            assert group.master is not None
            yield (
                {"REDIS_URL": group.url, "BULWARK_SENTINEL_MASTER": Sentinels.NAME},
                [group.master.port],
            )
        finally:
            group.stop()
    else:
        vhost = RabbitVhost().start()
        try:
            yield {"REDIS_URL": reference.url, "CELERY_BROKER_URL": vhost.url,
                   "CELERY_RESULT_BACKEND": reference.url}, [reference.port]  # fmt: skip
        finally:
            vhost.stop()


def policy_stats(ports: list[int]) -> tuple[int, int]:
    calls = usec = 0
    for port in ports:
        with redis.Redis(port=port) as node:
            calls += sum(commands(node).values())
            usec += sum(commands(node, "usec").values())
    return calls, usec


def policy_round_trips(env: dict[str, str]) -> float:
    """Round trips per guarded call (breaker + bulkhead) on this backend's policy store,
    in-process. A sentinel client's connections are redis-py's own (not counted): the
    same as one Redis's, which is what it talks to."""
    url = env["REDIS_URL"]
    if url.startswith("sentinel://"):
        return float("nan")
    client = connect(url, connection_class=CountingConnection)
    per_call, _seconds = guarded_round_trips(client, 500)
    return per_call


def run_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "celery", "-A", "bench.benchtasks", "worker", "-Q",
               "default", "-n", "bench@local", "-c", "2", "--without-mingle",
               "--without-gossip", "--loglevel=WARNING"]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def drain(name: str, env: dict[str, str], ports: list[int], n: int, log: Path) -> dict[str, float]:
    os.environ.update(env)
    settings.get_settings.cache_clear()
    resources.forget()
    done = connect(env["REDIS_URL"], master=Sentinels.NAME)
    done.delete(DONE)
    app = client()
    for i in range(n):
        # ignore_result: no result subscription per task (the bench counts in Redis)
        app.send_task("bench.guarded", args=[i], queue="default", ignore_result=True)
    worker = run_worker({**os.environ, "PYTHONPATH": str(ROOT)}, log)
    try:
        deadline = time.monotonic() + 120
        while int(done.get(DONE) or 0) < 1:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name}: the worker ran nothing; see {log}")
            time.sleep(0.001)
        first, before = time.perf_counter(), int(done.get(DONE) or 0)
        calls0, usec0 = policy_stats(ports)
        while (finished := int(done.get(DONE) or 0)) < n:
            if worker.poll() is not None or time.monotonic() > deadline + 600:
                raise SystemExit(f"{name}: the worker stopped at {finished}/{n}; see {log}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - first
        calls1, usec1 = policy_stats(ports)
    finally:
        worker.terminate()
        worker.wait(30)
        for key in env:
            os.environ.pop(key, None)
    ran = finished - before
    return {"rate": ran / elapsed, "commands": (calls1 - calls0) / ran,
            "usec": (usec1 - usec0) / ran}  # fmt: skip


def failover(name: str, reference: EmbeddedRedis, log: Path) -> None:
    """400 tasks, the policy master SIGKILLed after 100: longest completion gap, tasks lost."""
    if name == "cluster":
        topology: Any = Cluster(masters=3, replicas=1).start()
        env = {"REDIS_URL": topology.url, "CELERY_BROKER_URL": reference.url,
               "CELERY_RESULT_BACKEND": reference.url}  # fmt: skip
        victim: Callable[[], Any] = lambda: topology.master_of(  # noqa: E731
            keys.key("breaker", "bench", "state")
        )
    elif name == "sentinel":
        topology = Sentinels().start()
        env = {"REDIS_URL": topology.url, "BULWARK_SENTINEL_MASTER": Sentinels.NAME}
        victim = lambda: topology.master  # noqa: E731
    else:  # three RabbitMQ nodes of its own: the quorum queue's leader is killed
        topology = RabbitCluster().start()
        env = {"REDIS_URL": reference.url, "CELERY_BROKER_URL": topology.url,
               "CELERY_RESULT_BACKEND": reference.url}  # fmt: skip
        victim = lambda: topology.leader_of("default")  # noqa: E731
    try:
        os.environ.update({**env, "BENCH_RECORD_URL": reference.url})
        settings.get_settings.cache_clear()
        resources.forget()
        app = client()
        worker = run_worker({**os.environ, "PYTHONPATH": str(ROOT)}, log)
        ids = {app.send_task("bench.guarded_sleep", args=[i], queue="default",
                             ignore_result=True).id for i in range(400)}  # fmt: skip
        store = redis.Redis.from_url(reference.url)
        killed_at = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            finished = store.zrange(FINISHED, 0, -1, withscores=True)
            if killed_at is None and len(finished) >= 100:
                victim().kill()
                killed_at = time.time()
            if len({f.decode() for f, _ in finished} & ids) == len(ids):
                break
            time.sleep(0.05)
        worker.terminate()
        worker.wait(30)
        times = sorted(t for f, t in store.zrange(FINISHED, 0, -1, withscores=True)
                       if f.decode() in ids)  # fmt: skip
        gaps = [b - a for a, b in itertools.pairwise(times)]
        lost = len(ids) - len(times)
        print(f"failover {name:<9} longest gap {max(gaps):6.2f} s   tasks lost {lost}"
              f"   (of {len(ids)}, master killed at {killed_at is not None})")  # fmt: skip
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.pop("BENCH_RECORD_URL", None)
        topology.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--failover", action="store_true")
    parser.add_argument("--backends", default="redis,cluster,sentinel,rabbitmq")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    os.environ.update(dev_keys(folder / "keys").env("worker"))
    names = args.backends.split(",")
    if "rabbitmq" in names and not RabbitVhost.available():
        print("rabbitmq: no RabbitMQ on 127.0.0.1:5672 (rabbitmq-server -detached); skipped")
        names.remove("rabbitmq")
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with EmbeddedRedis() as reference:
        for _ in range(args.rounds):
            for name in names:
                reference_client = redis.Redis.from_url(reference.url)
                reference_client.flushall()
                with backend(name, reference) as (env, ports):
                    found = drain(name, env, ports, args.tasks, folder / f"{name}.log")
                    found["round_trips"] = policy_round_trips(env)
                    runs[name].append(found)
        base = statistics.mean(r["rate"] for r in runs["redis"]) if "redis" in runs else 0.0
        print(f"{args.tasks} guarded no-op tasks, prefork -c 2, security on, "
              f"{args.rounds} rounds (mean)")  # fmt: skip
        print(f"{'backend':<10} {'tasks/s':>9} {'vs redis':>9} {'policy cmds/task':>17} "
              f"{'policy usec/task':>17} {'round trips/call':>17}")  # fmt: skip
        for name, found in runs.items():
            rate = statistics.mean(r["rate"] for r in found)
            ratio = f"{rate / base:.2f}" if base else "-"
            print(f"{name:<10} {rate:9.0f} {ratio:>9} "
                  f"{statistics.mean(r['commands'] for r in found):17.1f} "
                  f"{statistics.mean(r['usec'] for r in found):17.1f} "
                  f"{statistics.mean(r['round_trips'] for r in found):17.2f}")  # fmt: skip
        if args.failover:
            for name in [n for n in names if n != "redis"]:
                redis.Redis.from_url(reference.url).flushall()
                failover(name, reference, folder / f"failover-{name}.log")


if __name__ == "__main__":
    main()
