"""Unit-test fixtures: fakeredis (with Lua) for pure logic, a fake clock."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from policies.clock import FakeClock


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    yield client
    client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
