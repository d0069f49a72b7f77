"""What zero-trust messages cost: security off, signed + verified, + encrypted.

    .venv/bin/python bench/security_overhead.py [--tasks 3000] [--rounds 2] [--prefetch 4]
                                                [--body noop|sleep]

On a private redis-server, with development keys made for the run, for each mode
(interleaved, `--rounds` times) it preloads `--tasks` no-op tasks (`bench.plain`,
one INCR each, no result; or with `--body sleep` 10 ms jobs, `bench.sleep`) through
`workers.client`, then starts a real prefork
worker (-c 2; `--prefetch` messages reserved per process, 4 as the README advises for short
jobs) and times the drain from its first task done to its last. Prints:

- enqueue rate of the client (signing, and sealing, happen there) and its ratio;
- worker throughput and its ratio to security off (targets: signed >= 0.90,
  + encrypted >= 0.85);
- Redis commands per task during the drain (INFO commandstats), by command, and
  round trips per task of the worker's broker connection are what kombu makes:
  the replay record rides on the unacked-index pipeline (no round trip of its own).

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
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import commands  # noqa: E402
from policies import keys  # noqa: E402
from workers.ops.embedded import EmbeddedRedis  # noqa: E402
from workers.security import context, sealed  # noqa: E402
from workers.security.keys import dev_keys  # noqa: E402
from workers.settings import get_settings  # noqa: E402

DONE = keys.key("bench", "tasks", "done")
BODIES = {"noop": "bench.plain", "sleep": "bench.sleep"}
MODES = {
    "security off": {"BULWARK_SECURITY": "off"},
    "signed + verified": {},
    "+ encrypted": {"BULWARK_ENCRYPT": "bench.*"},
}


def set_env(url: str, base: dict[str, str], mode: dict[str, str]) -> None:
    for name in ("BULWARK_SECURITY", "BULWARK_ENCRYPT"):
        os.environ.pop(name, None)
    os.environ["REDIS_URL"] = url  # the client too: never the developer's Redis
    os.environ.update(base)
    os.environ.update(mode)
    get_settings.cache_clear()
    context.forget()
    sealed.forget()


def one_run(url: str, base: dict[str, str], mode: dict[str, str], n: int, log: Path,
            prefetch: int, task: str = "bench.plain") -> dict:  # fmt: skip
    from workers.client import client  # lazy: after the mode's environment is set

    set_env(url, base, mode)
    r = redis.Redis.from_url(url)
    r.flushall()
    app = client()
    started = time.perf_counter()
    for i in range(n):
        app.send_task(task, args=[i], queue="default")
    enqueue = n / (time.perf_counter() - started)
    env = {
        **os.environ,
        "REDIS_URL": url,
        "PYTHONPATH": str(ROOT),
        "BULWARK_LOG_LEVEL": os.environ.get("BENCH_LOG", "warning"),
        "BULWARK_PREFETCH_MULTIPLIER": str(prefetch),
    }
    command = [
        sys.executable, "-m", "celery", "-A", "bench.benchtasks", "worker", "-Q", "default",
        "-n", "bench@local", "-c", "2", "--without-mingle", "--without-gossip",
        "--loglevel=WARNING",
    ]  # fmt: skip
    worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log.open("w"),
                              stderr=subprocess.STDOUT)  # fmt: skip
    try:
        while int(r.get(DONE) or 0) < 1:
            time.sleep(0.001)
        first, before = time.perf_counter(), commands(r)
        done_at = first
        while (done := int(r.get(DONE) or 0)) < n:
            time.sleep(0.002)
        done_at = time.perf_counter()
        after = commands(r)
    finally:
        worker.terminate()
        worker.wait(30)
    per_task = {k: (after.get(k, 0) - before.get(k, 0)) / (done - 1) for k in after}
    return {
        "enqueue": enqueue,
        "rate": (n - 1) / (done_at - first),
        "commands": {k: v for k, v in per_task.items() if v >= 0.05 and k != "info"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument(
        "--body",
        choices=sorted(BODIES),
        default="noop",
        help="noop (one INCR) or sleep (10 ms, then one INCR: an I/O-bound job)",
    )
    args = parser.parse_args()
    task = BODIES[args.body]
    folder = Path(tempfile.mkdtemp(prefix="bulwark-bench-keys-"))
    base = dev_keys(folder).env("worker")
    server = EmbeddedRedis().start()
    results: dict[str, list[dict]] = {name: [] for name in MODES}
    try:
        for round_ in range(args.rounds):
            for name, mode in MODES.items():
                found = one_run(server.url, base, mode, args.tasks, folder / "worker.log",
                                args.prefetch, task)  # fmt: skip
                results[name].append(found)
                print(f"round {round_ + 1} {name:18} {found['rate']:7.0f} tasks/s  "
                      f"enqueue {found['enqueue']:6.0f}/s", flush=True)  # fmt: skip
    finally:
        server.stop()
    off = statistics.median(r["rate"] for r in results["security off"])
    off_enqueue = statistics.median(r["enqueue"] for r in results["security off"])
    print(f"\n{args.tasks} {args.body} tasks, prefork -c 2, prefetch {args.prefetch}, median of "
          f"{args.rounds} rounds")  # fmt: skip
    print(f"{'mode':20} {'tasks/s':>8} {'ratio':>6} {'enqueue/s':>10} {'ratio':>6}  cmds/task")
    for name, runs in results.items():
        rate = statistics.median(r["rate"] for r in runs)
        enqueue = statistics.median(r["enqueue"] for r in runs)
        cmds = runs[-1]["commands"]
        shown = " ".join(f"{k}={v:.2f}" for k, v in sorted(cmds.items()))
        print(f"{name:20} {rate:8.0f} {rate / off:6.2f} {enqueue:10.0f} "
              f"{enqueue / off_enqueue:6.2f}  {sum(cmds.values()):.2f} ({shown})")  # fmt: skip


if __name__ == "__main__":
    main()
