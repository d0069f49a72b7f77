"""The Celery app: `celery -A workers.app worker|beat|flower`.

Configuration is added lazily: the environment is read when Celery first
needs its configuration, not at import.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery import Celery

from policies.errors import PolicyConfigError
from workers import balancing, lifecycle, quiet
from workers.amqp import whole_seconds
from workers.celeryconfig import build_config
from workers.security import audit, results, sealed, signer
from workers.settings import SettingsError, get_settings
from workers.task import ResilientTask
from workers.telemetry import logs, metrics, probes, task_events, tracing


class Bulwark(Celery):  # type: ignore[misc]
    """Celery, plus a check of `ResilientTask` options when a task is declared.

    Celery builds task classes lazily (when the app is finalized); Bulwark checks
    a task's policy names and options when the decorator runs, so a typo fails
    at import with a message naming it, not when the first job arrives.

    Remote control is signed and verified (`workers.security.control`): every command
    this app sends (`app.control`, also Flower's) carries its identity's signature, and
    a worker's pidbox obeys only commands a trusted identity with the right role signed.
    """

    amqp_cls = "workers.celeryconfig:BulwarkAMQP"

    #: Celery's own hook for the remote-control class (`Celery(control=...)`).
    control_cls = "workers.security.control:SignedControl"

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Celery's, with the arguments of an encrypted task sealed (a retry is sealed anew),
        and on RabbitMQ's delay exchanges a delay of at least a second (`whole_seconds`)."""
        args, kwargs = sealed.seal_send(name, args, kwargs, options)
        if get_settings().delays_in_broker:
            countdown, eta = whole_seconds(options.pop("countdown", None), options.pop("eta", None))
            options.update(countdown=countdown, eta=eta)
        return super().send_task(name, args, kwargs, **options)

    def task(self, *args: Any, **opts: Any) -> Any:
        balance = opts.pop("balance", None)  # Bulwark's, for any task: not a Task attribute
        base = opts.get("base")
        if isinstance(base, type) and issubclass(base, ResilientTask):
            base.check_options(opts)
            if opts.get("fallback") is not None:
                # A plain function as a class attribute would be bound to the task.
                opts["fallback"] = staticmethod(opts["fallback"])
        if balance is None:
            return super().task(*args, **opts)
        name = opts.get("name")
        if not isinstance(name, str):
            raise PolicyConfigError("a balanced task needs name=: producers route it by name")
        make = super().task(**opts)

        def balanced(fun: Any) -> Any:
            # The key checked against its arguments, and its position noted.
            balancing.declare(name, balance, fun, bound=bool(opts.get("bind")))
            return make(fun)

        return balanced(args[0]) if args and callable(args[0]) else balanced

    @cached_property
    def Worker(self) -> Any:  # Celery's name
        """`celery worker` says its shutdown as a log line, not a print (`workers.quiet`)."""
        return self.subclass_with_self("workers.quiet:QuietWorker")


def _config() -> dict[str, Any]:
    """The app's configuration; a bad setting ends the process with its message (Celery
    reads this lazily, deep in its start-up: a traceback would bury the message)."""
    try:
        return build_config(get_settings())
    except SettingsError as exc:
        raise SystemExit(f"bulwark: {exc}") from None


app = Bulwark("bulwark", include=["tasks.catalogue", "tasks.beat", "tasks.health", "tasks.alerts"])
app.add_defaults(_config)
results.install(app)  # results are signed and verified (workers.security.results)

# Signal handlers live with what they serve: lifecycle (preflight, listeners,
# heartbeats), logs, metrics and probes, task events on demand, tracing (each set up
# after the worker forks), audit, sealing and signing.
CONNECTED = (lifecycle, logs, metrics, probes, quiet, task_events, tracing, audit, sealed, signer)
for module in CONNECTED:
    module.connect()  # signer last: it signs a message's headers as the others left them
