"""`celery worker --autoscale=MAX,MIN` that sizes the pool from the load and the policies.

Celery's own autoscaler grows the pool while the worker has reserved more
messages than it has processes (it prefetches for MAX processes): it follows the
queue, not the load (60 % busy at a steady load in `bench/autoscale.py`), and
knows nothing of breakers or bulkheads. `Autoscaler` (the app's
`worker_autoscaler`) instead, every `BULWARK_AUTOSCALE_INTERVAL` seconds on a
thread of its own, reads the fleet snapshot and this worker's run-time totals
(its pool's `bulwark_task_runtime_seconds`) into a `Load` and decides with
`policies.autoscale.Scaler`; the event loop applies the decision: it grows at
once, shrinks only idle processes (billiard's `shrink`), only when that is safe,
and only after the scale-down window. Each change is logged with its reason and
counted (`bulwark_autoscale_decisions_total`); the last decision rides on the
worker's heartbeat, so `bulwark status` shows it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import psutil
from celery.worker import autoscale, state

from policies.autoscale import Decision, Scaler
from workers.fleet import PoolState, read_fleet
from workers.resources import broker, policy_redis
from workers.scaling.load import Meter, QueuePolicies, config_for, fleet_load, policies_of
from workers.settings import get_settings
from workers.telemetry.metrics import metrics, runtime_totals

__all__ = ["Autoscaler", "report"]

logger = logging.getLogger(__name__)


#: The pool as this process's autoscaler last left it (for the heartbeat, which the fleet
#: snapshot reads back as the same `PoolState`).
_report: PoolState | None = None
_report_lock = threading.Lock()


def report() -> dict[str, Any] | None:
    """The last decision of this process's autoscaler, JSON-ready (None without one)."""
    with _report_lock:
        return asdict(_report) if _report is not None else None


class Autoscaler(autoscale.Autoscaler):  # type: ignore[misc]
    """Celery's autoscaler with Bulwark's decision (see the module's doc)."""

    def __init__(self, pool: Any, max_concurrency: int, min_concurrency: int = 0,
                 worker: Any = None, keepalive: float | None = None,
                 mutex: Any = None) -> None:  # fmt: skip
        settings = get_settings()
        self.interval = settings.scaling.autoscale_interval
        super().__init__(pool, max_concurrency, min_concurrency, worker=worker,
                         keepalive=keepalive or self.interval, mutex=mutex)  # fmt: skip
        self._settings = settings
        self._meter = Meter()
        self._scaler = Scaler(config_for(settings, min_concurrency, max_concurrency))
        self._decided: Decision | None = None  # the deciding thread's latest, not applied
        self._decided_lock = threading.Lock()
        self._decider: threading.Thread | None = None
        self._policies: tuple[tuple[str, ...], QueuePolicies, dict[str, int]] | None = None
        psutil.cpu_percent(interval=None)  # the first reading only sets the baseline

    # Called by Celery on every task message and every `keepalive` seconds, on the event
    # loop: it only applies what the deciding thread decided (reading the fleet takes round
    # trips, and seconds of retries while Redis is unreachable: never on the loop).
    def _maybe_scale(self, req: Any = None) -> bool:
        self._start_deciding()
        with self._decided_lock:
            decision, self._decided = self._decided, None
        if decision is None:
            return False
        try:
            return self._apply(decision)
        except Exception:  # a failed grow (a fork refused) must never stop the consumer
            logger.warning("autoscale: could not apply %s", decision, exc_info=True)
            return False

    def _start_deciding(self) -> None:
        if self._decider is None or not self._decider.is_alive():
            self._decider = threading.Thread(
                target=self._deciding, name="bulwark-autoscale", daemon=True
            )
            self._decider.start()

    def _deciding(self) -> None:
        while True:
            started = time.monotonic()
            try:
                decision = self._decide(started)
            except Exception as exc:  # Redis unreachable, a bad reading: try again later
                if getattr(self.pool, "_pool", None) is None:
                    return  # the pool is gone: the worker is stopping
                logger.warning("autoscale: no decision this time: %s", exc)
                time.sleep(max(self.interval, 5.0))
                continue
            with self._decided_lock:
                self._decided = decision
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def _queues(self) -> tuple[str, ...]:
        consumer = getattr(self.worker, "consumer", None)
        task_consumer = getattr(consumer, "task_consumer", None)
        found = getattr(task_consumer, "queues", None) or ()
        return tuple(sorted(q.name for q in found))

    def _queue_policies(self, queues: tuple[str, ...]) -> tuple[QueuePolicies, dict[str, int]]:
        """The policies of the tasks on `queues`, and the declared limit of each bulkhead."""
        if self._policies is None or self._policies[0] != queues:
            self._policies = (queues, *policies_of(self.worker.app, self._settings, queues))
        return self._policies[1], self._policies[2]

    def _decide(self, now: float) -> Decision:
        queues = self._queues()
        snapshot = read_fleet(policy_redis(), broker(), queues).require()
        reserved, active = len(state.reserved_requests), len(state.active_requests)
        waiting_here = max(0, reserved - active)
        backlog = sum(snapshot.queue(q).backlog for q in queues) + waiting_here
        arrival, run_time = self._meter.rates(*runtime_totals(queues), backlog, now)
        self._scaler.config = config_for(self._settings, self.min_concurrency, self.max_concurrency)
        policies, limits = self._queue_policies(queues)
        load = fleet_load(
            snapshot,
            queues,
            policies,
            limits=limits,
            current=self.processes,
            waiting_here=waiting_here,
            arrival_rate=arrival,
            run_time=run_time,
            own=self._own_holder(),
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_percent=psutil.virtual_memory().percent,
        )
        return self._scaler.step(load, now)

    def _own_holder(self) -> Callable[[str], bool]:
        """Whether a bulkhead holder id (`<host>:<pid>:<nonce>`) is one of this pool's."""
        host = socket.gethostname()
        pids = {str(child.pid) for child in psutil.Process().children()}

        def own(holder: str) -> bool:
            parts = holder.rsplit(":", 2)
            return len(parts) == 3 and parts[0] == host and parts[1] in pids

        return own

    def _why_not_shrink(self) -> str | None:
        """Why stopping an idle process now could lose work or leave it running, or None.

        billiard's `shrink` SIGTERMs processes it finds without an accepted job, and counts
        each one it finds as stopped. Three kinds look idle and are not safe to count:
        - a process stopped by an earlier shrink that has not exited yet: it is found and
          counted again, so the pool believes it has fewer processes than are running,
          and the surplus is never stopped;
        - a process still starting: until its initializer has reset the signals it runs
          the worker's inherited SIGTERM handler, which in a pool child does nothing, so
          it never stops (and a warm shutdown then waits for it);
        - a process just written a job it has not acknowledged yet: stopping it loses
          that job.
        """
        pool = getattr(self.pool, "_pool", None)
        if pool is None:
            return None
        if any(getattr(process, "_controlled_termination", False) for process in pool._pool):
            return "a process stopped earlier has not exited yet"
        if getattr(pool, "_waiting_to_start", None):
            return "a process is still starting"
        if not all(job.worker_pids() for job in list(getattr(pool, "_cache", {}).values())):
            return "a job is not yet accepted by its process"
        return None

    def _shrink(self, n: int) -> bool:
        why = self._why_not_shrink()
        if why is not None:
            logger.debug("autoscale: not shrinking now: %s", why)
            return False  # the next decision asks again
        super()._shrink(n)
        return True

    def _apply(self, decision: Decision) -> bool:
        global _report
        before = self.processes
        changed = False
        if decision.desired > before:
            self.scale_up(decision.desired - before)
            changed = True
        elif decision.desired < before:
            if not self._shrink(before - decision.desired):
                return False
            changed = True
        after = self.processes
        with _report_lock:
            _report = PoolState(
                processes=after,
                desired=decision.desired,
                min=self.min_concurrency,
                max=self.max_concurrency,
                reason=decision.reason,
                at=time.time(),
            )
        direction = "up" if decision.desired > before else "down" if changed else "hold"
        metrics().autoscale.labels(direction=direction).inc()
        if changed:
            logger.info(
                "autoscale: %d -> %d processes: %s",
                before,
                decision.desired,
                decision.reason,
                extra={"processes": after, "desired": decision.desired},
            )
        return changed
