"""Session fixtures: a private redis-server on a random loopback port, real workers,
and for pure unit tests fakeredis (with Lua) and a fake clock."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import fakeredis
import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from policies.clock import FakeClock
from tests import kit
from tests.events import Events
from tests.kit import Worker
from tests.topologies import Cluster, RabbitVhost, Sentinels
from workers import balancing, guard, resources, settings
from workers.client import client
from workers.ops.embedded import EmbeddedRedis
from workers.security import audit, context, sealed
from workers.security.keys import dev_keys
from workers.stores import connect
from workers.telemetry import tracing

StartWorker = Callable[..., Worker]

#: Nothing listens here. Set before any test module is imported, so that whatever reads
#: the settings early (an app's configuration, once resolved, is kept) can never reach
#: the developer's Redis on 6379.
NOWHERE = "redis://127.0.0.1:1/0"


KEYS_DIR = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    for name in list(os.environ):
        if name.startswith(("BULWARK_", "CELERY_")):
            del os.environ[name]
    os.environ["REDIS_URL"] = NOWHERE
    # Security is on, as by default: one set of development keys for the session.
    folder = Path(tempfile.mkdtemp(prefix="bulwark-test-keys-"))
    config.stash[KEYS_DIR] = folder
    kit.SECURITY_ENV.update(dev_keys(folder).env("worker"))
    os.environ.update(kit.SECURITY_ENV)


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(KEYS_DIR, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A redis-server of our own, never the developer's on 6379."""
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def spare_redis() -> Iterator[EmbeddedRedis]:
    """A second redis-server of the test's own, for a test that kills or restarts it
    (the broker, the result backend or the policies' store apart from the session's)."""
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """A Redis Cluster of our own: 3 masters, each with a replica (for failovers)."""
    cluster = Cluster(masters=3, replicas=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinels() -> Iterator[Sentinels]:
    """A master and its replica, watched by three sentinels (master name "bulwark")."""
    group = Sentinels().start()
    yield group
    group.stop()


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitVhost]:
    """A vhost and user of the session's own on the machine's RabbitMQ (`.ci/run` starts
    it when none runs), deleted at the end."""
    kit.need(RabbitVhost.available(), "a RabbitMQ on 127.0.0.1:5672 and rabbitmqctl")
    vhost = RabbitVhost().start()
    yield vhost
    vhost.stop()


@pytest.fixture(params=["redis", "cluster", "sentinel"])
def store_url(
    request: pytest.FixtureRequest, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The policy store's URL, flushed first: the session's redis-server, its Redis Cluster,
    then its sentinel-watched master (a test that takes it runs once on each). The
    sentinel master's name is in the environment, for child processes."""
    if request.param == "redis":
        yield redis_url
        return
    if request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    else:
        url = request.getfixturevalue("redis_sentinels").url
        monkeypatch.setenv("BULWARK_SENTINEL_MASTER", Sentinels.NAME)
    client = connect(url, master=Sentinels.NAME)
    client.flushall()  # every master
    yield url
    client.close()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the session server, flushed first (also when requested dynamically)."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _settings_from_test_env(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Point in-process settings at the test Redis (flushed first), never at the developer's."""
    for name in list(os.environ):
        if name.startswith(("BULWARK_", "CELERY_")):
            monkeypatch.delenv(name)
    if "redis_url" in request.fixturenames:
        url = request.getfixturevalue("redis_url")
        with redis.Redis.from_url(url) as client:
            client.flushall()  # at setup: no test sees what another left behind
        monkeypatch.setenv("REDIS_URL", url)
    else:
        monkeypatch.setenv("REDIS_URL", NOWHERE)
    for name, value in kit.SECURITY_ENV.items():
        monkeypatch.setenv(name, value)
    settings.get_settings.cache_clear()
    resources.forget()
    context.forget()
    audit.forget()
    sealed.forget()
    guard.forget_guards()
    balancing.forget()


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator[StartWorker]:
    """Start real worker subprocesses; each is stopped after the test, and must exit
    cleanly (code 0 on SIGTERM) with no crash in its log, unless the test killed it."""
    started: list[Worker] = []

    def start(
        queues: list[str],
        *,
        name: str = "w",
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        app: str = "workers.app",
    ) -> Worker:
        worker = Worker(
            redis_url,
            queues,
            name=name,
            concurrency=concurrency,
            env=env,
            log=tmp_path / f"{name}.log",
            args=args,
            app=app,
        )
        started.append(worker)
        return worker.start()

    yield start
    problems = [p for worker in started for p in worker.stop_and_check()]
    assert not problems, "\n".join(problems)


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    yield client
    client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events(r: redis.Redis) -> Iterator[Events]:
    """Every Celery event the test's Redis carries from now on, as a monitor receives them."""
    captured = Events()
    captured.thread.start()
    yield captured
    captured.stop()


@pytest.fixture
def producer_spans() -> Iterator[InMemorySpanExporter]:
    """This process is a traced producer: the spans it makes are kept in memory, unredacted."""
    client()  # the producer set-up a real service gets, its provider replaced below
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(provider)
    yield exporter
    tracing.instrument(trace.get_tracer_provider())
    provider.shutdown()
