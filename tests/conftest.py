"""Session fixtures: a private redis-server on a random loopback port, real workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.kit import Worker
from workers.embedded import EmbeddedRedis


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
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the session server, flushed after each test."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(autouse=True)
def _settings_from_test_env(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Point in-process settings at the test Redis, never at the developer's."""
    from workers import resources, settings

    for name in list(__import__("os").environ):
        if name.startswith(("BULWARK_", "CELERY_")):
            monkeypatch.delenv(name)
    if "redis_url" in request.fixturenames:
        monkeypatch.setenv("REDIS_URL", request.getfixturevalue("redis_url"))
    else:
        monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    settings.get_settings.cache_clear()
    resources.forget_clients()
    from workers import guard
    from workers.registry import registry

    registry.forget_built()
    guard._guard.cache_clear()


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator[object]:
    """Start real worker subprocesses; every one is stopped after the test."""
    started: list[Worker] = []

    def start(
        queues: list[str],
        *,
        name: str = "w",
        concurrency: int = 2,
        env: dict[str, str] | None = None,
    ) -> Worker:
        worker = Worker(
            redis_url,
            queues,
            name=name,
            concurrency=concurrency,
            env=env,
            log=tmp_path / f"{name}.log",
        )
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()
