"""Replay a dead-lettered task: send it again, by name, to its queue."""

from __future__ import annotations

from policies.deadletter import DeadLetterStore
from workers.app import app


def replay(store: DeadLetterStore, letter_id: str) -> tuple[bool, str]:
    """Re-send one dead letter and remove it; (ok, message for the operator)."""
    letter = store.get(letter_id)
    if letter is None:
        return False, f"{letter_id}: no such dead letter"
    if not letter.replayable:
        return False, (
            f"{letter_id}: not replayable: the message was refused before decoding "
            f"({letter.reason}); inspect it with `bulwark deadletter list --json`"
        )
    result = app.send_task(
        letter.task_name,
        args=letter.args,
        kwargs=letter.kwargs,
        queue=letter.queue or None,
        headers={"bulwark_replayed_from": letter.id},
    )
    store.remove(letter.id)
    return True, f"{letter_id}: replayed {letter.task_name} as task {result.id}"
