"""Demo traffic for `make run`: another service enqueueing jobs by name.

It sends jobs with `send_task` by name only, as a producer outside this code
base would, and plays a flaky payments gateway: healthy for a while, down for
`BULWARK_DEMO_OUTAGE` seconds, then back. Watch the payments breaker open,
tasks being deferred, the breaker half-open and close again
(`bulwark status`, the worker logs, Flower). Runs until SIGTERM/SIGINT.
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

JOBS = (
    ("payments.charge", lambda i: ([f"order-{i}", random.randint(100, 50_000)], {})),
    ("inventory.reserve", lambda i: ([f"sku-{i % 40}", random.randint(1, 5)], {})),
    ("notifications.send", lambda i: ([f"user-{i % 100}@example.test", "receipt"], {})),
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


def main() -> None:
    configure()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    healthy = float(os.environ.get("BULWARK_DEMO_HEALTHY", "60"))
    outage = float(os.environ.get("BULWARK_DEMO_OUTAGE", "20"))
    threading.Thread(target=flaky_payments, args=(healthy, outage, stop), daemon=True).start()
    started = time.monotonic()
    sent = produce(float(os.environ.get("BULWARK_DEMO_RATE", "5")), stop)
    logger.info("demo: stopped after %d jobs in %.0f s", sent, time.monotonic() - started)


if __name__ == "__main__":
    main()
