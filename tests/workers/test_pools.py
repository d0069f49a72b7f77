"""Pools per dependency, sized from its bulkhead share: a real HTTP server sees no more
connections or concurrent requests than the share, however many threads ask."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import redis

from tasks.policies import PAYMENTS  # the catalogue's policies: payments has 4 permits
from workers.pools import http_pool, pool_for, share


class Gateway(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a pooled connection is reused
    lock = threading.Lock()
    busy = peak = 0
    ports: ClassVar[set[int]] = set()

    def do_GET(self) -> None:
        cls = type(self)
        with cls.lock:
            cls.busy += 1
            cls.peak = max(cls.peak, cls.busy)
            cls.ports.add(self.client_address[1])
        time.sleep(0.02)
        with cls.lock:
            cls.busy -= 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/charge"
    server.shutdown()


def test_the_share_is_the_bulkhead_limit_at_most(r: redis.Redis) -> None:
    assert share(PAYMENTS) == 1  # a prefork child runs one task at a time
    assert share(PAYMENTS, concurrency=16) == 4  # the payments bulkhead: 4 permits
    assert pool_for(PAYMENTS, object, concurrency=16).max_size == 4


def test_http_pool_holds_to_the_share_under_16_threads(r: redis.Redis, gateway: str) -> None:
    http = http_pool(PAYMENTS, concurrency=2)
    answers: list[int] = []

    def call() -> None:
        for _ in range(5):
            answers.append(http.request("GET", gateway).status)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == [200] * 80
    assert Gateway.peak <= 2 and len(Gateway.ports) <= 2, (Gateway.peak, Gateway.ports)
