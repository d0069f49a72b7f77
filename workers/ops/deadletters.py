"""`bulwark deadletter list|replay`: what could not run, and sending it again."""

from __future__ import annotations

import argparse
import json
from typing import Any

from policies.deadletter import DeadLetterStore
from workers.client import client
from workers.resources import deadletters
from workers.security import sealed
from workers.security.audit import Action, record
from workers.security.control import operator_actor


def replay(store: DeadLetterStore, letter_id: str) -> tuple[bool, str]:
    """Re-send one dead letter, by name, to its queue, and remove it; (ok, message)."""
    letter = store.get(letter_id)
    if letter is None:
        return False, f"{letter_id}: no such dead letter"
    if not letter.replayable:
        return False, (
            f"{letter_id}: not replayable: the message was refused before decoding "
            f"({letter.reason}); inspect it with `bulwark deadletter list --json`"
        )
    args, kwargs = letter.args, letter.kwargs
    if sealed.is_sealed(kwargs) and not args:  # an encrypted task's: opened to be sent anew
        kept = sealed.open_value(kwargs, letter.task_name, letter.task_id or "", "deadletter")
        args, kwargs = kept["args"], kept["kwargs"]
    result = client().send_task(
        letter.task_name,
        args=args,
        kwargs=kwargs,
        queue=letter.queue or None,
        headers={"bulwark_replayed_from": letter.id},
    )
    store.remove(letter.id)
    # Who replayed what, as which new task: never the letter's arguments, nor its reason
    # (a task's exception text may quote them).
    record(Action.DEADLETTER_REPLAYED, actor=operator_actor(), task_id=result.id,
           deadletter_id=letter.id, task=letter.task_name, queue=letter.queue or "",
           original_task_id=letter.task_id or "")  # fmt: skip
    return True, f"{letter_id}: replayed {letter.task_name} as task {result.id}"


def _cmd_list(args: argparse.Namespace) -> int:
    store = deadletters()
    letters = store.latest(args.limit)
    if args.json:
        print(json.dumps([json.loads(letter.to_json()) for letter in letters], indent=2))
        return 0
    print(f"{store.count()} dead-lettered ({store.total()} ever)")
    for letter in letters:
        print(f"{letter.id}  {letter.task_name:24} {letter.queue or '-':14} {letter.reason}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    store = deadletters()
    failures = 0
    for letter_id in args.ids:
        ok, message = replay(store, letter_id)
        print(message)
        failures += not ok
    return 1 if failures else 0


def register(sub: Any) -> None:
    """Add `bulwark deadletter list|replay` to the command's subparsers."""
    p = sub.add_parser("deadletter", help="list or replay dead-lettered tasks")
    dsub = p.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("list", help="the newest dead letters and why they are here")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_list)
    d = dsub.add_parser("replay", help="send dead letters again, by name, to their queue")
    d.add_argument("ids", nargs="+", metavar="ID")
    d.set_defaults(func=_cmd_replay)
