"""Redis clients for a store URL: one server, the master behind sentinels, or a cluster.

`connect(url, master=...)` reads the URL with `policies.endpoints` and builds the
matching redis-py client: `redis.Redis` for `redis://`, `rediss://` and `unix://`;
a `Sentinel(...).master_for(master)` client for `sentinel://` (it asks the
sentinels again after a failover); a `RedisCluster` for `redis+cluster://` (it
follows MOVED/ASK redirections, slot migrations and failovers by itself).

A `RedisCluster` answers the same commands, scripts, pipelines and pub/sub as a
`redis.Redis` for keys of one hash slot, which is what every policy uses (keys
hash-tagged per policy), so the rest of Bulwark takes it as one (`redis.Redis` in
annotations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from policies import endpoints
from workers.amqp import AmqpBroker
from workers.redis_pool import LeanConnectionPool
from workers.secrets import hide_password
from workers.settings import Settings

__all__ = ["StoreHealth", "check", "check_all", "connect", "describe"]


def connect(url: str, *, master: str = "mymaster", **options: Any) -> redis.Redis:
    """A client on the Redis `url` names; `options` go to every connection it makes
    (timeouts, `health_check_interval`, ...). `master`: the sentinel master's name."""
    endpoint = endpoints.parse(url)
    if endpoint.kind == "sentinel":
        auth = {"username": endpoint.username, "password": endpoint.password}
        timeouts = {k: v for k, v in options.items() if k.startswith("socket_")}
        sentinel = Sentinel(
            list(endpoint.nodes), sentinel_kwargs=timeouts, db=endpoint.db, **auth, **options
        )
        return sentinel.master_for(master)
    if endpoint.kind == "cluster":
        first, *_ = url.split(";")
        plain = first.replace("+cluster://", "://", 1)  # its query keeps the TLS options
        options.pop("retry", None)  # the cluster client retries redirections itself
        nodes = [ClusterNode(host, port) for host, port in endpoint.nodes]
        return cast(redis.Redis, RedisCluster(url=plain, startup_nodes=nodes, **options))
    if endpoint.kind == "amqp":
        raise ValueError(f"{endpoint.scheme}:// is RabbitMQ: no Redis client for it")
    client = redis.Redis(connection_pool=LeanConnectionPool.from_url(url, **options))
    client.auto_close_connection_pool = True  # as `redis.Redis.from_url` makes it
    return client


def describe(url: str) -> str:
    """What a URL names, for `bulwark status` and the logs: engine and node count."""
    endpoint = endpoints.parse(url)
    nodes = len(endpoint.nodes)
    return {
        "redis": "redis" if endpoint.scheme != "unix" else "redis (unix socket)",
        "sentinel": f"redis sentinel ({nodes} sentinels)",
        "cluster": f"redis cluster ({nodes} seed nodes)",
        "amqp": "rabbitmq" if nodes < 2 else f"rabbitmq ({nodes} nodes)",
    }[endpoint.kind]


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """One store as `bulwark status` shows it: role, engine, URL (password hidden), health."""

    role: str
    engine: str
    url: str
    ok: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "url": self.url, "ok": self.ok, "error": self.error}


def check(role: str, url: str, *, master: str = "mymaster", timeout: float = 2.0) -> StoreHealth:
    """Reach the store once (PING; a connection for RabbitMQ), never raising."""
    engine = describe(url)
    try:
        if endpoints.parse(url).kind == "amqp":
            rabbit = AmqpBroker(url, timeout=timeout)
            try:
                rabbit.ping()
            finally:
                rabbit.close()
        else:
            client = connect(
                url, master=master, socket_connect_timeout=timeout, socket_timeout=timeout
            )
            try:
                client.ping()
            finally:
                client.close()
    except Exception as exc:  # any failure is the answer, shown to the operator
        return StoreHealth(role, engine, hide_password(url), False, f"{type(exc).__name__}: {exc}")
    return StoreHealth(role, engine, hide_password(url), True)


def check_all(settings: Settings) -> list[StoreHealth]:
    """The policy store, broker and result backend in use, each reached once."""
    roles = (("policy", settings.redis_url), ("broker", settings.broker),
             ("backend", settings.backend))  # fmt: skip
    return [check(role, url, master=settings.sentinel_master) for role, url in roles]
