"""`bulwark alerts list|silence|silences|unsilence`."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import time
from typing import Any

from workers.resources import policy_redis
from workers.security.audit import Action, record
from workers.security.control import operator_actor
from workers.telemetry.alerts.model import iso
from workers.telemetry.alerts.store import AlertStore

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(raw: str) -> float:
    """`90`, `90s`, `15m`, `1h`, `2d` -> seconds."""
    match = _DURATION.match(raw.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected a duration like 90s, 15m, 1h or 2d")
    return float(match.group(1)) * _UNIT[match.group(2)]


def matcher(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{raw!r}: expected label=value, e.g. service=payments")
    return name.strip(), value.strip()


def _store() -> AlertStore:
    return AlertStore(policy_redis())


def _cmd_list(args: argparse.Namespace) -> int:
    store = _store()
    now = store.now()
    silences = store.silences()
    rows = []
    for alert in store.alerts():
        muted = any(s.active(now) and s.matches(alert) for s in silences)
        rows.append({**alert.to_dict(), "silenced": muted, "sent_at": iso(alert.sent_at)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no alerts firing")
    for a in rows:
        flag = " (silenced)" if a["silenced"] else ""
        print(f"{a['id']}  {a['severity']:8} {a['name']:22} {a['service']:14} {a['message']}{flag}")
    return 0


def _cmd_silence(args: argparse.Namespace) -> int:
    silence = _store().add_silence(
        dict(args.match), args.duration, comment=args.comment, by=args.by or getpass.getuser()
    )
    matchers = ",".join(f"{k}={v}" for k, v in sorted(silence.matchers.items()))
    record(Action.ALERT_SILENCED, actor=operator_actor(), silence_id=silence.id,
           matchers=matchers, until=iso(silence.ends_at) or "", by=silence.created_by,
           comment=silence.comment)  # fmt: skip
    print(f"silence {silence.id} until {iso(silence.ends_at)}")
    return 0


def _cmd_silences(args: argparse.Namespace) -> int:
    silences = _store().silences()
    if args.json:
        print(json.dumps([json.loads(s.to_json()) for s in silences], indent=2))
        return 0
    if not silences:
        print("no active silences")
    for s in silences:
        match = ",".join(f"{k}={v}" for k, v in sorted(s.matchers.items()))
        left = max(0.0, s.ends_at - time.time())
        print(f"{s.id}  {match:30} {left / 60:7.1f} min left  {s.created_by}: {s.comment}")
    return 0


def _cmd_unsilence(args: argparse.Namespace) -> int:
    if _store().remove_silence(args.id):
        record("alert.unsilenced", actor=operator_actor(), silence_id=args.id)
        print(f"silence {args.id} removed")
        return 0
    print(f"no silence {args.id}")
    return 1


def register(sub: Any) -> None:
    """Add `bulwark alerts ...` to the `bulwark` command's subparsers."""
    p = sub.add_parser("alerts", help="firing alerts and silences")
    asub = p.add_subparsers(dest="alerts_action", required=True)
    a = asub.add_parser("list", help="alerts firing now")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_list)
    a = asub.add_parser("silence", help="mute alerts matching labels for a while")
    a.add_argument("--match", type=matcher, action="append", required=True, metavar="LABEL=VALUE")
    a.add_argument("--for", dest="duration", type=duration, required=True, metavar="DURATION")
    a.add_argument("--comment", default="")
    a.add_argument("--by", default="")
    a.set_defaults(func=_cmd_silence)
    a = asub.add_parser("silences", help="active silences")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_silences)
    a = asub.add_parser("unsilence", help="remove a silence")
    a.add_argument("id")
    a.set_defaults(func=_cmd_unsilence)
