"""The worker command's application class, with its shutdown said as a log line.

Celery's worker writes "worker: Warm shutdown (MainProcess)" straight to the
terminal's file descriptor when it gets SIGTERM or SIGQUIT, past logging and
past `--quiet`. Under `bulwark up` every process logs JSON lines, so the
worker installs the same handlers without that print, and says the shutdown
through logging on `worker_shutting_down` instead.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.apps import worker as celery_worker

logger = logging.getLogger("bulwark.worker")


class QuietWorker(celery_worker.Worker):  # type: ignore[misc]
    """`celery worker`, with the SIGTERM/SIGQUIT handlers that log instead of print."""

    def install_platform_tweaks(self, worker: Any) -> None:
        super().install_platform_tweaks(worker)
        # Both are partials of Celery's own handler (REMAP_SIGTERM included);
        # installing them again replaces the printing ones.
        celery_worker.install_worker_term_handler(worker, verbose=False)
        celery_worker.install_worker_term_hard_handler(worker, verbose=False)


def _on_shutting_down(sender: Any = None, sig: str = "", how: str = "", **_: Any) -> None:
    logger.info("worker %s: %s shutdown on %s", sender, how.lower(), sig)


def connect() -> None:
    signals.worker_shutting_down.connect(
        _on_shutting_down, weak=False, dispatch_uid="bulwark.quiet.shutting_down"
    )
