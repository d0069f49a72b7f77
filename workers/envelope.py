"""What a well-formed message looks like, checked before anything acts on it.

Two layers, both pure functions that never raise on any input:

- `parse_envelope(raw)`: the bytes of one item of a kombu Redis queue list (or
  of its `unacked` hash) as kombu's virtual transport needs them: a JSON
  object with a base64 `body`, `headers`, `content-type` and `properties`
  holding `delivery_tag` and `delivery_info`. Anything else would raise
  inside kombu, before Celery or Bulwark could see it.
- `task_problem(headers, properties, body)`: a Celery protocol-2 task message
  whose headers have the types Celery relies on (`id`, `task`, `timelimit`,
  `eta`, `expires`, `retries`, ...) and whose body is `[args, kwargs, embed]`;
  in two halves, `header_problem` and `body_problem`, because the consumer
  verifies a message's signature between them, before it decodes the body.

Each returns the reason a message is refused, naming the field and what it
holds; the worker keeps the message in the dead-letter store with that reason.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kombu.utils.json import loads

__all__ = [
    "RAW_KEEP",
    "Envelope",
    "body_problem",
    "describe",
    "envelope_problem",
    "eta_problem",
    "header_problem",
    "kept_raw",
    "parse_envelope",
    "task_problem",
]

#: Bytes of a refused message kept in its dead letter (the length is kept too).
RAW_KEEP = 64 * 1024

#: Headers Celery reads as optional text.
_TEXT_HEADERS = (
    "lang",
    "root_id",
    "parent_id",
    "group",
    "origin",
    "shadow",
    "argsrepr",
    "kwargsrepr",
    "replaced_task_nesting",
)
#: Bulwark's own counters, set by the worker on a re-sent task.
_COUNT_HEADERS = ("bulwark_deferrals", "bulwark_attempt")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed queue item: the kombu payload, or why it cannot be one."""

    payload: dict[str, Any] | None
    problem: str | None

    @property
    def queue_hint(self) -> str | None:
        """The routing key the item claims, if it got that far."""
        if self.payload is None:
            return None
        info = self.payload.get("properties", {}).get("delivery_info", {})
        key = info.get("routing_key") if isinstance(info, dict) else None
        return key if isinstance(key, str) else None


def kept_raw(data: bytes) -> dict[str, Any]:
    """The `raw_body` (base64 of the first `RAW_KEEP` bytes) and `raw_size` of a dead letter."""
    return {"raw_body": base64.b64encode(data[:RAW_KEEP]).decode("ascii"), "raw_size": len(data)}


def describe(value: Any) -> str:
    """A short, safe account of a bad value: its type and a clipped repr."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


#: Containers nested deeper than this are refused: kombu re-encodes a message (recursively)
#: when it keeps it unacked, and a deep one would raise inside kombu.
MAX_DEPTH = 64


def parse_envelope(raw: bytes | str) -> Envelope:
    """Parse one queue item (as kombu does: its JSON with type hooks); `problem` says why
    kombu could not deliver it."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        return Envelope(None, f"not UTF-8 text: {exc.reason} at byte {exc.start}")
    try:
        payload = loads(text)
    except RecursionError:
        return Envelope(None, "not JSON: nested too deeply")
    except Exception as exc:  # kombu's type hooks raise TypeError, decimal errors, ...
        return Envelope(None, f"not JSON: {type(exc).__name__}: {exc}")
    if too_deep(payload, MAX_DEPTH):
        return Envelope(None, f"nested deeper than {MAX_DEPTH} levels")
    problem = envelope_problem(payload)
    return Envelope(payload if isinstance(payload, dict) else None, problem)


def too_deep(value: Any, limit: int) -> bool:
    """Whether lists and objects in `value` nest deeper than `limit` (no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def envelope_problem(payload: Any) -> str | None:
    """Why a decoded queue item is not a kombu envelope, or None if it is one."""
    if not isinstance(payload, dict):
        return f"not a kombu envelope: a JSON {type(payload).__name__}"
    for name, kind in (("body", str), ("headers", dict), ("properties", dict)):
        if name not in payload:
            return f"not a kombu envelope: '{name}' missing"
        if not isinstance(payload[name], kind):
            return f"not a kombu envelope: '{name}' is {describe(payload[name])}"
    for name in ("content-type", "content-encoding"):
        if not isinstance(payload.get(name), str):
            return f"not a kombu envelope: '{name}' is {describe(payload.get(name))}"
    properties = payload["properties"]
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return f"not a kombu envelope: properties.delivery_tag is {describe(tag)}"
    info = properties.get("delivery_info")
    if not isinstance(info, dict):
        return f"not a kombu envelope: properties.delivery_info is {describe(info)}"
    for name in ("exchange", "routing_key"):
        if not isinstance(info.get(name), str):
            return f"not a kombu envelope: delivery_info.{name} is {describe(info.get(name))}"
    priority = properties.get("priority", 0)
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
        return f"not a kombu envelope: properties.priority is {describe(priority)}"
    encoding = properties.get("body_encoding")
    if encoding == "base64":
        try:
            base64.b64decode(payload["body"], validate=True)
        except (binascii.Error, ValueError) as exc:
            return f"body is not base64 (body_encoding base64): {exc}"
    elif encoding is not None:
        return f"not a kombu envelope: unknown body_encoding {describe(encoding)}"
    return None


def task_problem(
    headers: Mapping[str, Any] | None, properties: Mapping[str, Any] | None, body: Any
) -> str | None:
    """Why a protocol-2 task message cannot run as sent, or None if it can."""
    return header_problem(headers, properties) or body_problem(body)


def header_problem(
    headers: Mapping[str, Any] | None, properties: Mapping[str, Any] | None
) -> str | None:
    """Why a protocol-2 task message's headers or properties cannot be run, or None."""
    if not isinstance(headers, Mapping):
        return f"task headers are {describe(headers)}"
    for name in ("id", "task"):
        value = headers.get(name)
        if not isinstance(value, str) or not value:
            return f"task header '{name}' is {describe(value)}: a non-empty string is required"
    for name in _TEXT_HEADERS:
        value = headers.get(name)
        if value is not None and not isinstance(value, str | int):
            return f"task header '{name}' is {describe(value)}: text or null is required"
    retries = headers.get("retries")
    if retries is not None and (
        not isinstance(retries, int) or isinstance(retries, bool) or retries < 0
    ):
        return f"task header 'retries' is {describe(retries)}: a whole number >= 0 is required"
    for name in _COUNT_HEADERS:
        value = headers.get(name)
        if value is not None and not _whole(value):
            return f"task header '{name}' is {describe(value)}: a whole number >= 0 is required"
    for name in ("eta", "expires"):
        problem = _time_problem(name, headers.get(name))
        if problem:
            return problem
    limits = headers.get("timelimit")
    if limits is not None and not _limits(limits):
        return (
            f"task header 'timelimit' is {describe(limits)}: "
            "[soft, hard] (each a number of seconds or null) is required"
        )
    if properties is not None and not isinstance(properties, Mapping):
        return f"message properties are {describe(properties)}"
    for name in ("correlation_id", "reply_to"):
        value = (properties or {}).get(name)
        if value is not None and not isinstance(value, str):
            return f"message property '{name}' is {describe(value)}: text or null is required"
    return None


def _whole(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18


def _number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value == value
        and value >= 0
    )


def _limits(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(v is None or _number(v) for v in value)
    )


def _time_problem(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        return f"task header '{name}' is {describe(value)}: an ISO 8601 time or null is required"
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return f"task header '{name}' is {describe(value)}: not an ISO 8601 time"
    return None


def body_problem(body: Any) -> str | None:
    """The decoded body of a protocol-2 message: [args, kwargs, embed]."""
    if not isinstance(body, list | tuple) or len(body) != 3:
        return f"task body is {describe(body)}: [args, kwargs, embed] is required"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return f"task args are {describe(args)}: a list is required"
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return f"task kwargs are {describe(kwargs)}: an object with text keys is required"
    if embed is not None and not isinstance(embed, dict):
        return f"task embed is {describe(embed)}: an object is required"
    for name in ("callbacks", "errbacks", "chain"):
        value = (embed or {}).get(name)
        if value is not None and not isinstance(value, list | tuple):
            return f"task embed '{name}' is {describe(value)}: a list or null is required"
    chord = (embed or {}).get("chord")
    if chord is not None and not isinstance(chord, dict):
        return f"task embed 'chord' is {describe(chord)}: an object or null is required"
    return None


def eta_problem(eta: Any, horizon: float, now: float | None = None) -> str | None:
    """Why a task due at `eta` may not be held by a worker: more than `horizon` s ahead."""
    if not isinstance(eta, str):
        return None
    try:
        due = datetime.fromisoformat(eta)
    except ValueError:
        return None  # task_problem names a malformed ETA
    if due.tzinfo is None:
        due = due.replace(tzinfo=UTC)
    ahead = due.timestamp() - (time.time() if now is None else now)
    if ahead <= horizon:
        return None
    return (
        f"ETA {ahead:.0f} s ahead is beyond what a worker may hold ({horizon:.0f} s: the "
        "visibility timeout less the task time limit); it would be delivered twice. "
        "Schedule it nearer its time, or raise BULWARK_VISIBILITY_TIMEOUT"
    )
