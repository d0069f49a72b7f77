"""Demo traffic for `make run`: another service enqueueing jobs by name.

It sends jobs with `send_task` by name only, as a producer outside this code
base would, and plays a flaky payments gateway: healthy for a while, down for
`BULWARK_DEMO_OUTAGE` seconds, then back. Watch the payments breaker open,
tasks being deferred, the breaker half-open and close again
(`bulwark status`, the worker logs, Flower). Stock lookups of popular SKUs go
through the tiered cache (`catalog.stock`): its hit ratio is in `bulwark status`.
Shipping labels (`shipping.label`) are balanced over two shard queues by order: this
producer never imports the catalogue and learns the shards from the workers, through
Redis. It also puts load phases on
inventory: 20 s after the start and then every `BULWARK_DEMO_LOAD_EVERY`
seconds, `BULWARK_DEMO_LOAD_SECONDS` of `BULWARK_DEMO_LOAD_RATE` extra jobs a
second whose calls take 400 ms: watch the general worker's pool grow
(`autoscale: 2 -> ...` in its log, `bulwark status`), beat ask for more general
workers (`scaling: worker_general wants 2 workers`) and `bulwark up` start
`worker_general.2`; after the load and the scale-down window, the pool shrinks
and the extra worker retires. Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
import threading
import time

from tasks.dependencies import dependency
from workers.client import client
from workers.telemetry.logs import configure

logger = logging.getLogger("bulwark.demo")


def popular_sku() -> str:
    """A SKU as shoppers look them up: a few are asked for far more often (Zipf-like)."""
    return f"sku-{min(199, int(random.paretovariate(1.2)) - 1)}"


JOBS = (
    ("payments.charge", lambda i: ([f"order-{i}", random.randint(100, 50_000)], {})),
    ("inventory.reserve", lambda i: ([f"sku-{i % 40}", random.randint(1, 5)], {})),
    ("notifications.send", lambda i: ([f"user-{i % 100}@example.test", "receipt"], {})),
    # stock lookups go through the tiered cache: `bulwark status` shows its hit ratio
    ("catalog.stock", lambda i: ([popular_sku()], {})),
    # balanced over shipping.0 and shipping.1 by order (`bulwark status`: BALANCING)
    ("shipping.label", lambda i: ([f"order-{i // 3}", i % 3], {})),
)


def produce(rate: float, stop: threading.Event) -> int:
    producer = client(name="demo-producer")
    sent = 0
    for i in itertools.count():
        if stop.is_set():
            break
        name, make = JOBS[i % len(JOBS)]
        args, kwargs = make(i)
        producer.send_task(name, args=args, kwargs=kwargs)
        sent += 1
        if sent % 100 == 0:
            logger.info("demo: %d jobs sent", sent)
        stop.wait(1.0 / rate)
    return sent


def flaky_payments(healthy: float, outage: float, stop: threading.Event) -> None:
    """Take the payments gateway down for `outage` s after each `healthy` s, forever."""
    gateway = dependency("payments")
    while not stop.wait(healthy):
        logger.info("demo: payments gateway DOWN for %.0f s", outage)
        gateway.set_outage(outage)
        if stop.wait(outage):
            break
        logger.info("demo: payments gateway back up")
    gateway.set_outage(0)


def load_phases(first: float, every: float, length: float, rate: float,
                stop: threading.Event) -> None:  # fmt: skip
    """Heavy inventory traffic for `length` s, after `first` s and then every `every` s."""
    gateway = dependency("inventory")
    producer = client(name="demo-producer")
    wait = first
    while not stop.wait(wait):
        wait = every
        logger.info("demo: LOAD on inventory for %.0f s: %.0f more jobs/s, 400 ms each",
                    length, rate)  # fmt: skip
        gateway.set_latency(0.4)
        end, sent = time.monotonic() + length, 0
        while time.monotonic() < end and not stop.is_set():
            producer.send_task("inventory.reserve", args=[f"sku-load-{sent % 40}", 1])
            sent += 1
            stop.wait(1.0 / rate)
        gateway.set_latency(None)
        logger.info("demo: load over after %d jobs", sent)


def main() -> None:
    configure()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    healthy = float(os.environ.get("BULWARK_DEMO_HEALTHY", "60"))
    outage = float(os.environ.get("BULWARK_DEMO_OUTAGE", "20"))
    threading.Thread(target=flaky_payments, args=(healthy, outage, stop), daemon=True).start()
    load = (
        20.0,
        float(os.environ.get("BULWARK_DEMO_LOAD_EVERY", "120")),
        float(os.environ.get("BULWARK_DEMO_LOAD_SECONDS", "40")),
        float(os.environ.get("BULWARK_DEMO_LOAD_RATE", "16")),
    )
    threading.Thread(target=load_phases, args=(*load, stop), daemon=True).start()
    started = time.monotonic()
    sent = produce(float(os.environ.get("BULWARK_DEMO_RATE", "5")), stop)
    logger.info("demo: stopped after %d jobs in %.0f s", sent, time.monotonic() - started)


if __name__ == "__main__":
    main()
