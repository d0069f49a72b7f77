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

import contextlib
import json
import logging
import multiprocessing
import os
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
from workers.ops.scaling import STALE_AFTER, extra_command, extra_name, plan_changes
from workers.scaling.fleet import read_decisions
from workers.stores import connect

__all__ = ["SupervisedManager"]

logger = logging.getLogger(__name__)


class SupervisedManager(Manager):  # type: ignore[misc]
    """A honcho Manager that restarts crashed processes instead of stopping the fleet."""

    def __init__(
        self,
        *,
        policy: RestartPolicy | None = None,
        redis_url: str | None = None,
        sentinel_master: str = "mymaster",
        host: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        scale_every: float = 15.0,
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
        # Fleet scaling (workers.ops.scaling): each group's first worker's command, env
        # and folder; the indexes of its running extras; the extras being retired.
        self._groups: dict[str, tuple[str, dict[str, str] | None, str | None]] = {}
        self._extras: dict[str, set[int]] = {}
        self._retiring: set[str] = set()
        self.scale_every = scale_every
        self._scale_at = 0.0
        self._redis = (
            connect(
                redis_url,
                master=sentinel_master,
                socket_connect_timeout=1.0,
                socket_timeout=1.0,
            )
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
            if self._groups and self._now() >= self._scale_at:
                # beat decides every scale_every s; a read (one HGETALL) every 2 s at most
                # acts on a decision within 2 s of it
                self._scale_at = self._now() + min(2.0, self.scale_every)
                self._scale()
        if self.returncode is None:
            self.returncode = 0

    def _handle(self, msg: Any) -> None:
        if msg.type == "line":
            self._printer.write(msg)
        elif msg.type == "start":
            p = self._processes[msg.name]
            p["pid"] = msg.data["pid"]
            self._system_print("{} started (pid={})\n".format(msg.name, msg.data["pid"]))
            if self._terminating or msg.name in self._retiring:  # asked to stop meanwhile
                self._stop_main(p["pid"])
        elif msg.type == "stop":
            code = msg.data["returncode"]
            self._processes[msg.name]["returncode"] = code
            self._system_print(f"{msg.name} stopped (rc={code})\n")
            if msg.name in self._retiring:
                self._retiring.discard(msg.name)
                del self._processes[msg.name]
                self._system_print(f"{msg.name} retired (the fleet scaler wanted fewer)\n")
            elif not self._terminating:
                self._crashed(msg.name, code)

    def _killall(self, force: bool = False) -> None:
        """honcho's, except that a process still starting (no pid yet) is skipped: it is
        sent SIGTERM the moment it reports its pid; and that SIGTERM goes to the main
        process only (commands are exec'd, so that is the program itself): a Celery
        worker's warm shutdown stops its pool, whose processes must not get SIGTERM
        themselves (they would drop the tasks they run). SIGKILL goes to the group."""
        for name, p in self._processes.items():
            if "returncode" in p or "pid" not in p:
                continue
            signame = "SIGKILL" if force else "SIGTERM"
            self._system_print(f"sending {signame} to {name} (pid {p['pid']})\n")
            if force:
                self._procmgr.kill(p["pid"])
            else:
                self._stop_main(p["pid"])

    @staticmethod
    def _stop_main(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    # -- fleet scaling ---------------------------------------------------------------------------

    def add_group(
        self, name: str, command: str, env: dict[str, str] | None = None, cwd: str | None = None
    ) -> None:
        """Scale Procfile worker entry `name` (added with `add_process` too) on beat's
        decisions: extra copies start and retire as its desired worker count changes."""
        self._groups[name] = (command, env, cwd)
        self._extras[name] = set()

    def _scale(self) -> None:
        if self._redis is None:
            return
        try:
            decisions = read_decisions(self._redis)
        except redis.RedisError as exc:
            self._system_print(f"fleet scaling: Redis unreachable ({exc}); nothing changed\n")
            return
        retiring: dict[str, set[int]] = {}
        for name in self._retiring:
            group, _, index = name.rpartition(".")
            retiring.setdefault(group, set()).add(int(index))
        changes = plan_changes(decisions, self._extras, now=time.time(),
                               stale_after=STALE_AFTER * self.scale_every,
                               retiring=retiring)  # fmt: skip
        for change in changes:
            if self._stop_signal is not None:
                return  # stopping (the signal came during the read): start nothing more
            name = extra_name(change.group, change.index)
            decision = decisions[change.group]
            why = f"beat wants {decision.desired}: {decision.reason}"
            if change.action == "start":
                command, env, cwd = self._groups[change.group]
                try:
                    extra = extra_command(command, change.index)
                except ValueError as exc:
                    self._system_print(f"fleet scaling: {change.group} cannot scale: {exc}\n")
                    continue
                self._system_print(f"scaling: starting {name} ({why})\n")
                if name not in self._processes:
                    self.add_process(name, extra, env=env, cwd=cwd)
                self._extras[change.group].add(change.index)
                self._restart(name)
            else:
                self._system_print(f"scaling: retiring {name} with a warm shutdown ({why})\n")
                self._extras[change.group].discard(change.index)
                self._due.pop(name, None)
                self._retiring.add(name)
                p = self._processes.get(name, {})
                if "pid" in p and "returncode" not in p:
                    self._stop_main(p["pid"])
                elif "returncode" in p:  # it had crashed and waits for its restart
                    self._retiring.discard(name)
                    del self._processes[name]

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
