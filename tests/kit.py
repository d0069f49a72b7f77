"""A small test kit: deadline polls and real worker processes."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from policies.breaker import BreakerSnapshot
from policies.degradation import Level, ServiceState
from workers.fleet import heartbeat_key
from workers.stores import connect

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def poll(
    check: Callable[[], T], *, deadline: float = 15.0, every: float = 0.05, what: str = ""
) -> T:
    """Call `check` until it returns something truthy; fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    last: T | None = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(
        f"timed out after {deadline:g} s waiting for {what or check!r} (last: {last!r})"
    )


def need(available: object, what: str) -> None:
    """Skip without `what` on a developer's machine; fail under CI, where .ci/run installs it."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what}: CI must have it (.ci/run installs it)")
    pytest.skip(f"{what} (.ci/run installs it)")


#: The session's development keys (`tests/conftest.py`): every test process and child
#: signs as the identity "worker" (may send any task) and verifies with this trust store.
SECURITY_ENV: dict[str, str] = {}


def child_env(
    redis_url: str, extra: Mapping[str, str] | None = None, *, keys: bool = True
) -> dict[str, str]:
    """The environment of a child process: the test Redis, the session's keys (unless
    `keys=False`: `bulwark up` makes its own), and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BULWARK_", "CELERY_"))}
    if keys:
        env.update(SECURITY_ENV)
    env.update(
        REDIS_URL=redis_url,
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    env.update(extra or {})
    return env


def start_beat(
    redis_url: str, folder: Path, name: str = "beat", env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A real `celery beat` subprocess in a session of its own, logging to `<name>.log`."""
    command = [
        sys.executable, "-m", "celery", "-A", "workers.app", "beat", "--loglevel=INFO",
        f"--schedule={folder / f'{name}-schedule'}",
    ]  # fmt: skip
    log = (folder / f"{name}.log").open("ab")
    return subprocess.Popen(
        command, env=child_env(redis_url, env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def stop_session(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM a subprocess's whole session; SIGKILL it if it has not exited in `timeout` s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def stacks(pid: int) -> str:
    """The Python stacks of process `pid` and its children (py-spy), to say where a
    process that does not stop waits; empty if py-spy cannot tell."""
    spy = Path(sys.executable).with_name("py-spy")
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid, *map(int, children.read_text().split())] if children.exists() else [pid]
    dumps = []
    for each in pids:
        try:
            done = subprocess.run([str(spy), "dump", "--pid", str(each)], capture_output=True,
                                  text=True, timeout=20)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        dumps.append(done.stdout or done.stderr)
    return "\n".join(dumps)


class Worker:
    """A real `celery worker` subprocess; ready once its heartbeat key is in Redis."""

    def __init__(
        self,
        redis_url: str,
        queues: Sequence[str],
        *,
        name: str,
        concurrency: int = 2,
        env: Mapping[str, str] | None = None,
        log: Path,
        args: Sequence[str] = (),
        app: str = "workers.app",
    ) -> None:
        self.redis_url = redis_url
        self.hostname = f"{name}@test"
        self.log = log
        self.command = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-Q", ",".join(queues), "-n", self.hostname, "-c", str(concurrency),
            "--without-mingle", "--without-gossip", "--loglevel=INFO", *args,
        ]  # fmt: skip
        # Its own metrics folder: two tests' workers may share a hostname, and a worker
        # removes its folder when it stops.
        self.env = child_env(redis_url, {"BULWARK_METRICS_DIR": str(log.parent / "metrics"),
                                         **(env or {})})  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.killed = False
        self.stacks = ""

    def start(self, deadline: float = 30.0) -> Worker:
        out = self.log.open("ab")
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        client = connect(self.redis_url, master=self.env.get("BULWARK_SENTINEL_MASTER", "mymaster"))
        key = heartbeat_key(self.hostname)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
            return bool(client.exists(key))

        poll(ready, deadline=deadline, what=f"worker {self.hostname} ready")
        return self

    def pool_size(self) -> int:
        """Processes of the pool now: the main process's live children, read from /proc
        (a child that exited and is not reaped yet, a zombie, does not count)."""
        assert self.process is not None
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        live = 0
        for pid in path.read_text().split():
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue  # gone meanwhile
            live += state != "Z"
        return live

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool): no warm shutdown."""
        assert self.process is not None
        self.killed = True
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 15.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            # The main process only: a warm shutdown, which stops the pool children itself.
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stacks = stacks(self.process.pid)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def stop_and_check(self, expected: tuple[str, ...] = ()) -> list[str]:
        """Stop, then what went wrong: an unclean exit, or a crash in the log.

        A crash is a raw traceback (printed outside the JSON log lines), a
        critical line, or Celery's "Unrecoverable error". A task's own failure is
        logged as a JSON line with its exception inside: that is not a crash. A
        critical line whose message starts with one of `expected` is what the test
        caused (a broker killed under an unacknowledged task: "Couldn't ack").
        """
        code = self.stop()
        if self.killed or self.process is None:
            return []
        problems = []
        if code != 0:
            problems.append(f"worker {self.hostname} exited with {code}")
        if self.stacks:
            problems.append(f"worker {self.hostname} did not stop; its stacks:\n{self.stacks}")
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("Traceback") or "Unrecoverable error" in line:
                problems.append(f"worker {self.hostname} crashed: {line[:300]}")
            elif line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                message = str(entry.get("message", ""))
                if entry.get("level") == "critical" and not message.startswith(expected or "\0"):
                    problems.append(f"worker {self.hostname} logged critical: {line[:300]}")
        if problems:
            problems.append(f"log {self.log}:\n{self.log.read_text(errors='replace')[-3000:]}")
        return problems


# -- hand-made parts of a fleet snapshot -------------------------------------------------------


def breaker_snapshot(name: str, state: str = "closed", **fields: Any) -> BreakerSnapshot:
    """A `BreakerSnapshot` as a store would report it, for hand-made fleet snapshots."""
    circuit = {"forced_open": "open", "disabled": "closed", "metrics_only": "closed"}
    values: dict[str, Any] = {
        "name": name,
        "state": state,
        "circuit": circuit.get(state, state),
        "failures": 0,
        "window_calls": 0,
        "window_failures": 0,
        "opened_until": None,
        "retry_after": 0.0,
        "trips": 0,
        "trials_in_flight": 0,
        "trial_successes": 0,
        "gen": 0,
        "source": "redis",
    }
    return BreakerSnapshot(**{**values, **fields})


def service_state(name: str, level: str = "full", **fields: Any) -> ServiceState:
    """A `ServiceState` as a store would report it, for hand-made fleet snapshots."""
    values: dict[str, Any] = {
        "service": name,
        "level": Level.parse(level),
        "from_level": Level.parse(level),
        "changed": False,
        "gen": 0,
        "reason": "",
        "source": "",
        "floor": Level.full,
        "now": 0.0,
        "changed_at": None,
        "left_full_at": None,
        "healthy_since": None,
        "recovered": None,
        "last_recovery": None,
        "recoveries": (),
    }
    return ServiceState(**{**values, **fields})


def redis_contents(r: redis.Redis) -> dict[bytes, bytes]:
    """Every key in Redis and all it holds (strings, lists, hashes, sets, zsets, streams)."""
    found: dict[bytes, bytes] = {}
    client: Any = r  # bytes in, bytes out (redis-py types its replies as bytes | str)
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        parts: list[Any] = []
        if kind == b"string":
            parts.append(client.get(key))
        elif kind == b"list":
            parts += client.lrange(key, 0, -1)
        elif kind == b"hash":
            parts += [k + b"=" + v for k, v in client.hgetall(key).items()]
        elif kind == b"set":
            parts += client.smembers(key)
        elif kind == b"zset":
            parts += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for entry_id, fields in client.xrange(key):
                parts += [entry_id, *(k + b"=" + v for k, v in fields.items())]
        else:
            parts.append(b"<" + kind + b">")
        found[key] = b"\n".join(bytes(p or b"") for p in parts)
    return found


def free_port() -> int:
    """A loopback port free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, with basic auth if given; (0, b"") if nothing answers."""
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def embedded_redis(banner: str) -> tuple[int, Path]:
    """From `bulwark up`'s banner: the embedded Redis's port, and the file that holds the
    operator's password (the ACL users' passwords sit beside it)."""
    port = re.search(r"redis://\S*127\.0\.0\.1:(\d+)", banner)
    operator = re.search(r"BULWARK_REDIS_PASSWORD_FILE=(\S+)", banner)
    assert port is not None and operator is not None, f"not a banner with ACL users:\n{banner}"
    return int(port.group(1)), Path(operator.group(1))
