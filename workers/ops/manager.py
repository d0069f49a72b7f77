"""honcho's process manager, with a restart policy: one crash does not stop the fleet.

honcho runs the Procfile and multiplexes its output, but stops every process as
soon as one exits. `SupervisedManager` restarts a process that exits on its own,
after a back-off (`policies.restart.RestartPolicy`), and reports a crash loop
(N crashes within M seconds) once per loop: a line in the output, and an entry
in Redis that the fleet snapshot reads (metrics `bulwark_process_restarts`,
`bulwark_process_crash_looping` and the `ProcessCrashLoop` alert). SIGINT or
SIGTERM stops everything, as with plain honcho: SIGTERM to each process group,
SIGKILL after `KILL_WAIT` seconds.

Why honcho plus a policy rather than supervisord or circus: the Procfile stays
the one list of processes (honcho parses it), output stays one coloured stream,
and nothing needs an ini file or a daemon of its own.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import queue
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import redis
from honcho.manager import KILL_WAIT, SIGNALS, Manager

from policies.restart import RestartPolicy
from workers.fleet import SUPERVISORS_INDEX, processes_key

__all__ = ["SupervisedManager"]

logger = logging.getLogger(__name__)


class SupervisedManager(Manager):  # type: ignore[misc]
    """A honcho Manager that restarts crashed processes instead of stopping the fleet."""

    def __init__(
        self,
        *,
        policy: RestartPolicy | None = None,
        redis_url: str | None = None,
        host: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.policy = policy or RestartPolicy()
        self.host = host or socket.gethostname()
        self._now = clock
        self._crashes: dict[str, list[float]] = {}
        self._looping: set[str] = set()
        self._due: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._stop_signal: int | None = None
        self._crash_count: dict[str, int] = {}
        self._redis = (
            redis.Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
            if redis_url
            else None
        )

    # -- the loop ------------------------------------------------------------------------------

    def loop(self) -> None:
        def _stop(signum: int, frame: Any) -> None:
            self._stop_signal = signum  # acted on by the loop, never inside the handler

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        self._start()
        stopping_since: float | None = None
        while True:
            if self._stop_signal is not None and not self._terminating:
                self._system_print("{} received\n".format(SIGNALS[self._stop_signal]["name"]))
                self.returncode = SIGNALS[self._stop_signal]["rc"]
                self.terminate()
            try:
                msg = self.events.get(timeout=0.1)
            except queue.Empty:
                msg = None
            if msg is not None:
                self._handle(msg)
            if self._terminating:
                if self._all_stopped():
                    break
                if stopping_since is None:
                    stopping_since = self._now()
                elif self._now() - stopping_since > KILL_WAIT:
                    self.kill()
                continue
            for name, at in list(self._due.items()):
                if at <= self._now():
                    del self._due[name]
                    self._restart(name)
            self._settle_loops()
        if self.returncode is None:
            self.returncode = 0

    def _handle(self, msg: Any) -> None:
        if msg.type == "line":
            self._printer.write(msg)
        elif msg.type == "start":
            p = self._processes[msg.name]
            p["pid"] = msg.data["pid"]
            self._system_print("{} started (pid={})\n".format(msg.name, msg.data["pid"]))
            if self._terminating:  # restarted just as the fleet began to stop
                self._procmgr.terminate(p["pid"])
        elif msg.type == "stop":
            code = msg.data["returncode"]
            self._processes[msg.name]["returncode"] = code
            self._system_print(f"{msg.name} stopped (rc={code})\n")
            if not self._terminating:
                self._crashed(msg.name, code)

    def _killall(self, force: bool = False) -> None:
        """honcho's, except that a process still starting (no pid yet) is skipped: it is
        sent SIGTERM the moment it reports its pid."""
        for name, p in self._processes.items():
            if "returncode" in p or "pid" not in p:
                continue
            signame = "SIGKILL" if force else "SIGTERM"
            self._system_print(f"sending {signame} to {name} (pid {p['pid']})\n")
            if force:
                self._procmgr.kill(p["pid"])
            else:
                self._procmgr.terminate(p["pid"])

    # -- restarts ------------------------------------------------------------------------------

    def _crashed(self, name: str, code: int) -> None:
        now = self._now()
        self._crash_count[name] = self._crash_count.get(name, 0) + 1
        crashes = self._crashes.setdefault(name, [])
        crashes.append(now)
        del crashes[: max(0, len(crashes) - 100)]
        delay = self.policy.delay(crashes, now)
        self._due[name] = now + delay
        looping = self.policy.looping(crashes, now)
        if looping and name not in self._looping:
            self._looping.add(name)
            self._system_print(
                f"{name} is crash-looping: {self.policy.recent(crashes, now)} crashes in "
                f"{self.policy.loop_window:g} s; restarting it every {delay:g} s, "
                "the rest of the fleet keeps running\n"
            )
        elif not looping:
            self._looping.discard(name)
        self._system_print(f"{name} exited (rc={code}); restarting in {delay:g} s\n")
        self._report(name, code, looping)

    def _restart(self, name: str) -> None:
        p = self._processes[name]
        p.pop("pid", None)
        p.pop("returncode", None)
        p["process"] = multiprocessing.Process(
            name=name, target=p["obj"].run, args=(self.events, True)
        )
        p["process"].start()
        self._started[name] = self._now()

    def _settle_loops(self) -> None:
        """A crash-looping process that has stayed up for a whole window is fine again."""
        for name in list(self._looping):
            up_since = self._started.get(name)
            p = self._processes[name]
            stayed = up_since is not None and self._now() - up_since >= self.policy.loop_window
            if stayed and "returncode" not in p:
                self._looping.discard(name)
                self._system_print(f"{name} has stayed up: no longer crash-looping\n")
                self._report(name, 0, False)

    def _report(self, name: str, code: int, looping: bool) -> None:
        """Keep this process's restarts and crash-loop state in Redis; never raise."""
        if self._redis is None:
            return
        entry = {
            "process": name,
            "host": self.host,
            "restarts": self._crash_count.get(name, 0),
            "last_exit": code,
            "crash_looping": looping,
            "at": time.time(),
        }
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(processes_key(self.host), name, json.dumps(entry))
            pipe.sadd(SUPERVISORS_INDEX, self.host)
            pipe.execute()
        except redis.RedisError as exc:
            self._system_print(f"could not record the restart of {name} in Redis: {exc}\n")
