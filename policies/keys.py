"""The one place Redis key names are built.

Keys look like ``bulwark:{<policy>:<name>}:<field>``. The braces are a Redis
Cluster hash tag, so every key of one policy instance lives in one slot and a
Lua script may touch all of them.
"""

from __future__ import annotations

import re

PREFIX = "bulwark"
_SAFE = re.compile(r"^[A-Za-z0-9_.:@-]+$")


def _check(part: str, what: str) -> str:
    if not part or not _SAFE.match(part) or "{" in part or "}" in part:
        raise ValueError(f"{what} {part!r} must be non-empty and use only A-Z a-z 0-9 _ . : @ -")
    return part


def tag(policy: str, name: str) -> str:
    """The hash-tagged stem shared by every key of one policy instance."""
    return f"{PREFIX}:{{{_check(policy, 'policy')}:{_check(name, 'name')}}}"


def key(policy: str, name: str, field: str) -> str:
    """The full key of one field of one policy instance."""
    return f"{tag(policy, name)}:{_check(field, 'field')}"


def safe(part: str) -> bool:
    """Whether `part` may be a name or field of a key as it is."""
    return bool(part) and bool(_SAFE.match(part))


def channel(policy: str, name: str) -> str:
    """The pub/sub channel on which a policy instance announces changes."""
    return key(policy, name, "events")


def pattern(policy: str, field: str) -> str:
    """A SCAN/KEYS pattern matching `field` of every instance of `policy`."""
    return f"{PREFIX}:{{{_check(policy, 'policy')}:*}}:{_check(field, 'field')}"


def index(policy: str) -> str:
    """The set of the instance names of `policy` (see `policies.index`)."""
    return key("index", policy, "names")


def name_of(full_key: str) -> str:
    """The instance name inside a key built by `key()`."""
    start, end = full_key.index("{") + 1, full_key.index("}")
    return full_key[start:end].split(":", 1)[1]
