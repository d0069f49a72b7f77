"""Flower on the Bulwark app, logging as every other process does (`python -m workers.ops.flower`).

Flower hands its logging to tornado, which prints its own plain-text format.
This entry point configures Bulwark's logging first (JSON lines with secrets
masked, or plain text with `BULWARK_LOG_JSON=false`), then runs `celery flower`
with tornado's own logging off and Celery's banner quiet. Arguments are passed
on to Flower.
"""

from __future__ import annotations

import sys

from celery.bin.celery import main as celery_main

from workers.telemetry.logs import configure


def main(argv: list[str] | None = None) -> None:
    configure()
    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["celery", "-A", "workers.app", "--quiet", "flower", "--logging=none", *args]
    celery_main()


if __name__ == "__main__":
    main()
