"""The small HTTP server each worker (and beat) runs: /metrics, /healthz, /readyz.

Stdlib `http.server` in a daemon thread of the worker's main process, started
when the worker is ready, bound to `BULWARK_HTTP_HOST` (127.0.0.1 by default)
on `BULWARK_HTTP_PORT` (0: a free port). The address it got is advertised in
Redis at `bulwark:{http:<process>}:address` (JSON {host, port, pid, url}) with
the heartbeat's TTL, so tests and operators can find a worker that picked its
own port.

Probes never call `celery inspect ping`: liveness looks at this process and its
event loop only (never the broker); readiness looks at the consumer's broker
connection and pings the broker.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from policies import keys

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, data: Mapping[str, Any]) -> Response:
        return cls(status, json.dumps(data, default=str).encode() + b"\n")


Route = Callable[[], Response]


class _Handler(BaseHTTPRequestHandler):
    routes: Mapping[str, Route] = {}

    def do_GET(self) -> None:
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            response = Response.json(404, {"error": "not found", "paths": sorted(self.routes)})
        else:
            try:
                response = route()
            except Exception as exc:  # a probe that crashes says so, it does not hang
                logger.exception("HTTP route %s failed", self.path)
                response = Response.json(500, {"error": f"{type(exc).__name__}: {exc}"})
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http %s " + format, self.client_address[0], *args)


class Server:
    """A ThreadingHTTPServer serving `routes` from a daemon thread."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Route]) -> None:
        handler = type("Handler", (_Handler,), {"routes": dict(routes)})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="bulwark-http", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Server:
        self._thread.start()
        return self

    def advertise(self, client: Any, process: str, ttl: float) -> None:
        """Keep `address_key(process)` alive with this server's address (daemon thread)."""
        key = address_key(process)
        value = json.dumps(
            {"host": self.host, "port": self.port, "pid": os.getpid(), "url": self.url}
        )

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    client.set(key, value, px=int(ttl * 1000))
                except Exception:
                    logger.warning("could not advertise %s", key, exc_info=True)
                self._stop.wait(ttl / 3)

        threading.Thread(target=loop, name="bulwark-http-advertise", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def address_key(process: str) -> str:
    """Where a process (worker hostname, or `beat@<host>`) advertises its HTTP address."""
    return keys.key("http", process, "address")


def wait_address(client: Any, process: str, deadline: float = 30.0) -> dict[str, Any]:
    """The advertised address of `process`, waiting up to `deadline` seconds for it."""
    end = time.monotonic() + deadline
    while True:
        raw = client.get(address_key(process))
        if raw:
            data: dict[str, Any] = json.loads(raw)
            return data
        if time.monotonic() > end:
            raise TimeoutError(f"{process} advertised no HTTP address in {deadline:g} s")
        time.sleep(0.05)
