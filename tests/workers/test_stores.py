"""The three stores' URLs: the client each gets, its health, and a mix refused at start."""

from __future__ import annotations

import subprocess
import sys

import redis
from redis.cluster import RedisCluster

from tests.kit import ROOT, child_env
from tests.topologies import Cluster, Sentinels
from workers.stores import check, connect, describe

NOWHERE = "redis://127.0.0.1:1/0"


def test_each_url_gets_its_client(redis_url: str, redis_cluster: Cluster) -> None:
    assert type(connect(redis_url)) is redis.Redis
    cluster = connect(redis_cluster.url)
    assert isinstance(cluster, RedisCluster) and cluster.ping()
    sentinel = connect("sentinel://127.0.0.1:1;sentinel://127.0.0.1:2/3", master="m")
    assert sentinel.connection_pool.service_name == "m"  # type: ignore[attr-defined]
    assert sentinel.connection_pool.connection_kwargs["db"] == 3


def test_health_is_an_answer_never_an_exception(redis_url: str, redis_sentinels: Sentinels) -> None:
    assert check("policy", redis_url).ok
    assert check("policy", redis_sentinels.url, master=Sentinels.NAME).ok
    down = check("broker", "redis://user:s3cret@127.0.0.1:1/0", timeout=0.5)
    assert not down.ok and "ConnectionError" in (down.error or "")
    assert "s3cret" not in down.url and "***" in down.url
    rabbit = check("broker", "amqp://guest:guest@127.0.0.1:1//", timeout=0.5)
    assert not rabbit.ok and rabbit.engine == "rabbitmq"
    assert describe("sentinel://a:1;sentinel://b:2") == "redis sentinel (2 sentinels)"


def test_a_mix_that_cannot_work_stops_a_worker_naming_it() -> None:
    env = child_env(NOWHERE, {"CELERY_BROKER_URL": "redis+cluster://127.0.0.1:7000"})
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "default"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "CELERY_BROKER_URL: kombu has no Redis Cluster transport" in done.stderr
    assert "Traceback" not in done.stderr
