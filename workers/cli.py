"""The `bulwark` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from policies.errors import PolicyConfigError
from workers.embedded import RedisUnavailable
from workers.settings import SettingsError, describe, get_settings


def _cmd_up(args: argparse.Namespace) -> int:
    from workers.supervisor import up

    return up(get_settings(), Path(args.procfile), only=args.only, without=args.without)


def _cmd_proc(args: argparse.Namespace) -> int:
    from workers.supervisor import proc

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


def _cmd_deadletter(args: argparse.Namespace) -> int:
    from workers.resources import deadletters

    store = deadletters()
    if args.action == "list":
        letters = store.latest(args.limit)
        if args.json:
            print(json.dumps([json.loads(letter.to_json()) for letter in letters], indent=2))
            return 0
        print(f"{store.count()} dead-lettered ({store.total()} ever)")
        for letter in letters:
            print(f"{letter.id}  {letter.task_name:24} {letter.queue or '-':14} {letter.reason}")
        return 0
    from workers.replay import replay

    failures = 0
    for letter_id in args.ids:
        ok, message = replay(store, letter_id)
        print(message)
        failures += not ok
    return 1 if failures else 0


def _load_catalogue() -> None:
    """Import the task modules, so declared policies (and their overrides) are known."""
    from workers.app import app

    app.loader.import_default_modules()


def _cmd_status(args: argparse.Namespace) -> int:
    from workers.resources import policy_redis
    from workers.status import fleet_status, render

    status = fleet_status(policy_redis())
    print(json.dumps(status, indent=2, default=str) if args.json else render(status))
    return 0


BREAKER_ACTIONS = {
    "open": "force_open",
    "close": "reset",
    "reset": "reset",
    "disable": "disable",
    "metrics-only": "metrics_only",
}


def _cmd_breaker(args: argparse.Namespace) -> int:
    from workers.guard import policy

    _load_catalogue()
    breaker = policy("breaker", args.name)
    state = getattr(breaker, BREAKER_ACTIONS[args.action])()
    print(f"breaker {args.name}: {state}")
    return 0


def _cmd_degrade(args: argparse.Namespace) -> int:
    from workers.guard import policy

    _load_catalogue()
    service = policy("service", args.service)
    state = service.set_level(args.level, args.reason)
    print(f"service {args.service}: {state.from_level} -> {state.level} ({state.reason})")
    return 0


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

    p = sub.add_parser("status", help="breakers, bulkheads, degradation levels, dead letters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("breaker", help="operate a circuit breaker (fleet-wide)")
    p.add_argument("action", choices=sorted(BREAKER_ACTIONS))
    p.add_argument("name")
    p.set_defaults(func=_cmd_breaker)

    p = sub.add_parser("degrade", help="set a service's degradation level (fleet-wide)")
    p.add_argument("service")
    p.add_argument("level", choices=["full", "degraded", "minimal", "offline"])
    p.add_argument("--reason", default="set by operator")
    p.set_defaults(func=_cmd_degrade)

    from workers import alerts, health

    health.register_cli(sub)
    alerts.register_cli(sub)

    p = sub.add_parser("deadletter", help="list or replay dead-lettered tasks")
    dsub = p.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("list")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("replay")
    d.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=_cmd_deadletter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (SettingsError, RedisUnavailable, PolicyConfigError) as exc:
        print(f"bulwark: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
