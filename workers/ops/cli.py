"""The `bulwark` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import redis

from policies.errors import PolicyConfigError
from workers.app import app
from workers.fleet import FleetUnreadable
from workers.ops import acl, alerts, audit, deadletters, keys, status
from workers.ops.supervisor import ProcfileError, proc, up
from workers.resources import RedisUnavailable, policy, wait_for_redis
from workers.security.audit import Action, record
from workers.security.control import operator_actor
from workers.security.keys import KeyFileError
from workers.settings import SettingsError, describe, get_settings
from workers.telemetry.redact import redact


def _cmd_up(args: argparse.Namespace) -> int:
    return up(get_settings(), Path(args.procfile), only=args.only, without=args.without)


def _cmd_proc(args: argparse.Namespace) -> int:
    proc(get_settings(), Path(args.procfile), args.name)
    return 0  # not reached: proc() replaces this process


def _cmd_settings(args: argparse.Namespace) -> int:
    rows = list(describe())
    if args.markdown:
        print("| group | variable | default | accepts | meaning |")
        print("|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        return 0
    get_settings()  # validate the current environment
    for group, env, default, _accepts, doc in rows:
        print(f"{group:14} {env:38} {default:24} {doc}")
    return 0


def _load_catalogue() -> None:
    """Import the task modules, so declared policies (and their overrides) are known."""
    app.loader.import_default_modules()


BREAKER_ACTIONS = {
    "open": "force_open",
    "close": "reset",
    "reset": "reset",
    "disable": "disable",
    "metrics-only": "metrics_only",
}


class NotApplied(RuntimeError):
    """A change that did not reach Redis: it must not be reported as done."""


def _cmd_breaker(args: argparse.Namespace) -> int:
    _load_catalogue()
    breaker = policy("breaker", args.name)
    before = breaker.snapshot().state
    state = getattr(breaker, BREAKER_ACTIONS[args.action])()
    shared = breaker.snapshot()
    if shared.source != "redis" or shared.state != state:
        raise NotApplied(
            f"breaker {args.name}: the change did not reach Redis (it reads {shared.state} "
            f"from {shared.source}); nothing was changed for the fleet"
        )
    reset = BREAKER_ACTIONS[args.action] == "reset"
    record(Action.BREAKER_RESET if reset else Action.BREAKER_FORCED, actor=operator_actor(),
           breaker=args.name, command=args.action, from_state=before, to_state=state)  # fmt: skip
    print(f"breaker {args.name}: {state}")
    return 0


def _cmd_degrade(args: argparse.Namespace) -> int:
    _load_catalogue()
    service = policy("service", args.service)
    state = service.set_level(args.level, args.reason)
    if state.source_store != "redis":
        raise NotApplied(
            f"service {args.service}: the change did not reach Redis; nothing was changed "
            "for the fleet"
        )
    record(Action.SERVICE_DEGRADED, actor=operator_actor(), service=args.service,
           from_level=str(state.from_level), to_level=str(state.level),
           reason=state.reason)  # fmt: skip
    print(f"service {args.service}: {state.from_level} -> {state.level} ({state.reason})")
    return 0


def _reachable() -> None:
    """Fail now, naming the problem, if the policies' Redis does not answer."""
    settings = get_settings()
    wait_for_redis(settings.redis_url, deadline=2.0, master=settings.sentinel_master).close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bulwark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "up", help="start the fleet of the Procfile (embedded Redis if no REDIS_URL)"
    )
    p.add_argument("--procfile", default="Procfile")
    p.add_argument("--only", action="append", default=[], metavar="PROCESS")
    p.add_argument("--without", action="append", default=[], metavar="PROCESS")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("proc", help="run one Procfile entry in the foreground (for containers)")
    p.add_argument("name", metavar="PROCESS")
    p.add_argument("--procfile", default="Procfile")
    p.set_defaults(func=_cmd_proc)

    p = sub.add_parser("settings", help="list every setting, its variable and default")
    p.add_argument("--markdown", action="store_true")
    p.set_defaults(func=_cmd_settings)

    status.register(sub)

    p = sub.add_parser("breaker", help="operate a circuit breaker (fleet-wide)")
    p.add_argument("action", choices=sorted(BREAKER_ACTIONS))
    p.add_argument("name")
    p.set_defaults(func=_cmd_breaker)

    p = sub.add_parser("degrade", help="set a service's degradation level (fleet-wide)")
    p.add_argument("service")
    p.add_argument("level", choices=["full", "degraded", "minimal", "offline"])
    p.add_argument("--reason", default="set by operator")
    p.set_defaults(func=_cmd_degrade)

    alerts.register(sub)
    deadletters.register(sub)
    audit.register(sub)
    keys.register(sub)
    acl.register(sub)
    return parser


EXPECTED = (
    SettingsError,
    RedisUnavailable,
    PolicyConfigError,
    FleetUnreadable,
    NotApplied,
    ProcfileError,
    KeyFileError,
)


#: Commands that read or change the fleet's state in Redis: Redis is checked first.
NEEDS_REDIS = frozenset({"status", "health", "breaker", "degrade", "alerts", "deadletter"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in NEEDS_REDIS:
            _reachable()
        return int(args.func(args))
    except EXPECTED as exc:
        return _fail(str(exc))
    except redis.RedisError as exc:
        return _fail(f"Redis error: {type(exc).__name__}: {exc}")
    except BrokenPipeError:
        # `bulwark ... | head`: the reader left. Say nothing more, and write nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _fail(message: str) -> int:
    print(f"bulwark: {redact(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
