"""Demo traffic for `make run`: another service enqueueing jobs by name.

It only uses `send_task` with task names, as a producer outside this code base
would. Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
import threading
import time

from workers.client import client

logger = logging.getLogger("bulwark.demo")

JOBS = (
    ("payments.charge", lambda i: ([f"order-{i}", random.randint(100, 50_000)], {})),
    ("inventory.reserve", lambda i: ([f"sku-{i % 40}", random.randint(1, 5)], {})),
    ("notifications.send", lambda i: ([f"user-{i % 100}@example.test", "receipt"], {})),
)


def run(rate: float = 5.0, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    producer = client(name="demo-producer")
    sent = 0
    for i in itertools.count():
        if stop.is_set():
            break
        name, make = JOBS[i % len(JOBS)]
        args, kwargs = make(i)
        producer.send_task(name, args=args, kwargs=kwargs)
        sent += 1
        if sent % 50 == 0:
            logger.info("demo producer: %d jobs sent", sent)
        stop.wait(1.0 / rate)
    return sent


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    sent = run(float(os.environ.get("BULWARK_DEMO_RATE", "5")), stop)
    logger.info("demo producer stopped: %d jobs in %.0f s", sent, time.monotonic() - started)


if __name__ == "__main__":
    main()
