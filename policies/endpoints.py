"""Where the fleet's three stores live, read from their URLs: which engine, which nodes.

The policy store (`REDIS_URL`), the broker (`CELERY_BROKER_URL`) and the result
backend (`CELERY_RESULT_BACKEND`) are three settings, each one of:

- `redis://`, `rediss://`, `unix://`: one Redis server;
- `sentinel://host:port;sentinel://host:port/DB`: a Redis master found through its
  sentinels (kombu's and Celery's form; the master's name is a setting);
- `redis+cluster://host:port;...` (or `rediss+cluster://`): a Redis Cluster, any
  node(s) to start from, database 0 only;
- `amqp://`, `pyamqp://`, `amqps://`: RabbitMQ; `amqp://a;amqp://b;...` names the
  nodes of a cluster, tried in turn (kombu's failover: Celery moves to the next one when
  the node it is connected to goes away).

`problems()` says which mix cannot work, before anything connects.
"""

from __future__ import annotations

import functools
import urllib.parse
from dataclasses import dataclass
from typing import Literal

__all__ = ["BadEndpoint", "Endpoint", "Kind", "parse", "problems"]

Kind = Literal["redis", "sentinel", "cluster", "amqp"]

_KINDS: dict[str, Kind] = {
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
    "sentinel": "sentinel",
    "redis+cluster": "cluster",
    "rediss+cluster": "cluster",
    "amqp": "amqp",
    "amqps": "amqp",
    "pyamqp": "amqp",
}


class BadEndpoint(ValueError):
    """A store URL that cannot be used; the message says why (never the password)."""


#: More nodes than this in one URL is not a topology, it is a mistake (or an attack).
MAX_NODES = 64


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One store: its engine, the nodes named (host, port) and the database."""

    kind: Kind
    scheme: str
    nodes: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None

    @property
    def tls(self) -> bool:
        return self.scheme in ("rediss", "rediss+cluster", "amqps")


def _node(part: str, scheme: str) -> urllib.parse.SplitResult:
    split = urllib.parse.urlsplit(part)
    if split.scheme != scheme:
        raise BadEndpoint(f"mixes {scheme}:// and {split.scheme or 'no scheme'}:// in one URL")
    return split


@functools.lru_cache(maxsize=64)
def parse(url: str) -> Endpoint:
    """The endpoint of a store URL; `ValueError` names what is wrong with it. Cached: a
    process asks about the same few URLs (its settings') again and again."""
    text = url.strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    kind = _KINDS.get(scheme)
    if kind is None:
        known = ", ".join(f"{s}://" for s in _KINDS)
        raise BadEndpoint(f"unknown scheme {scheme or '(none)'!r}: use one of {known}")
    parts = [p for p in text.split(";") if p.strip()]
    if len(parts) > MAX_NODES:
        raise BadEndpoint(f"names {len(parts)} nodes; at most {MAX_NODES}")
    if len(parts) > 1 and kind not in ("sentinel", "cluster", "amqp"):
        raise BadEndpoint(f"{scheme}:// names one server; only sentinel://, redis+cluster:// "
                         "and amqp:// take a ;-separated list")  # fmt: skip
    splits = [_node(p.strip(), scheme) for p in parts]
    nodes: list[tuple[str, int]] = []
    for split in splits:
        try:
            port = split.port
        except ValueError:
            raise BadEndpoint(f"port of {split.netloc.rsplit('@', 1)[-1]!r} is not a number "
                             "from 0 to 65535") from None  # fmt: skip
        if kind in ("sentinel", "cluster") and not (split.hostname and port):
            raise BadEndpoint(f"each node of a {scheme}:// URL needs host:port")
        if split.hostname:
            nodes.append((split.hostname, port or 0))
    last = splits[-1]
    db = 0
    path = last.path.strip("/")
    if scheme == "unix":  # the path is the socket's; the database is a query parameter
        path = urllib.parse.parse_qs(last.query).get("db", [""])[-1]
    if kind != "amqp" and path:
        if not path.isdigit() or len(path) > 5:
            raise BadEndpoint(f"database {path!r} is not a number")
        db = int(path)
    if kind == "cluster" and db != 0:
        raise BadEndpoint("a Redis Cluster has database 0 only")
    first = splits[0]
    return Endpoint(
        kind=kind,
        scheme=scheme,
        nodes=tuple(nodes),
        db=db,
        username=urllib.parse.unquote(first.username) if first.username else None,
        password=urllib.parse.unquote(first.password) if first.password else None,
    )


def problems(policy: str, broker: str, backend: str) -> list[str]:
    """Why this mix of policy store, broker and result backend cannot work (empty: it can).

    Each argument is the URL of that store (the broker and backend default to the
    policy store's URL before they get here).
    """
    found: list[str] = []
    roles = (
        ("REDIS_URL", "policy store", policy),
        ("CELERY_BROKER_URL", "broker", broker),
        ("CELERY_RESULT_BACKEND", "result backend", backend),
    )
    parsed: dict[str, Endpoint] = {}
    for setting, role, url in roles:
        try:
            parsed[role] = parse(url)
        except ValueError as exc:
            found.append(f"{setting}: {exc}")
    policy_end, broker_end, backend_end = (
        parsed.get(r) for r in ("policy store", "broker", "result backend")
    )
    if policy_end is not None and policy_end.kind == "amqp":
        found.append(
            "REDIS_URL: the policy store must be Redis (one server, sentinel:// or "
            "redis+cluster://): the policies are Lua scripts; RabbitMQ can only be the broker"
        )
    if broker_end is not None and broker_end.kind == "cluster":
        found.append(
            "CELERY_BROKER_URL: kombu has no Redis Cluster transport; use one Redis, "
            "sentinel:// or amqp:// for the broker (the policy store can be the cluster)"
        )
    if backend_end is not None and backend_end.kind in ("cluster", "amqp"):
        engine = "a Redis Cluster" if backend_end.kind == "cluster" else "RabbitMQ"
        found.append(
            f"CELERY_RESULT_BACKEND: {engine} cannot be the result backend here; use one "
            "Redis or sentinel:// (set CELERY_RESULT_BACKEND apart from the broker)"
        )
    return found
