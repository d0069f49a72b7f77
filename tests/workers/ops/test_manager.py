"""The supervisor: a crashed process is restarted with a back-off, a crash loop is reported
(output and Redis), the others never stop, and SIGINT still stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from tests.kit import ROOT, child_env, poll
from workers.fleet import read_fleet
from workers.ops.manager import SupervisedManager

pytestmark = pytest.mark.integration

RUNNER = textwrap.dedent(
    """
    import sys
    from policies.restart import RestartPolicy
    from workers.ops.manager import SupervisedManager

    manager = SupervisedManager(
        policy=RestartPolicy(base_delay=0.1, max_delay=0.4, loop_restarts=3, loop_window=30),
        redis_url=sys.argv[1],
        host="testhost",
    )
    manager.add_process("steady", "sleep 600")
    manager.add_process("crashy", "sleep 0.2; exit 3")
    manager.loop()
    sys.exit(manager.returncode)
    """
)


def pids(text: str, name: str) -> list[int]:
    return [int(p) for p in re.findall(rf"system \| {name} started \(pid=(\d+)\)", text)]


class TestSupervisedManager:
    """One process crash-loops; the other keeps its one pid throughout."""

    def test_restart_backoff_crash_loop_and_clean_stop(
        self, r: redis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        log_path = tmp_path / "manager.log"
        with log_path.open("w") as log:
            manager = subprocess.Popen(
                [sys.executable, "-c", RUNNER, redis_url],
                env=child_env(redis_url), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            poll(
                lambda: "crashy is crash-looping" in log_path.read_text(),
                deadline=30,
                what="the crash loop reported",
            )
            text = log_path.read_text()
            assert len(pids(text, "crashy")) >= 3, "restarted again and again"
            assert len(pids(text, "steady")) == 1, "the other process never stopped"
            delays = [
                float(d) for d in re.findall(r"crashy exited \(rc=3\); restarting in (\S+) s", text)
            ]
            assert delays[:3] == [0.1, 0.2, 0.4], "exponential back-off, capped"
            (entry,) = poll(
                lambda: [p for p in read_fleet(r, r, []).processes if p.crash_looping],
                what="the crash loop in the fleet snapshot",
            )
            assert (entry.host, entry.process, entry.last_exit) == ("testhost", "crashy", 3)
            assert entry.restarts >= 3
        finally:
            os.kill(manager.pid, signal.SIGINT)
            code = manager.wait(timeout=15)
        text = log_path.read_text()
        assert code == 130, text
        assert "SIGINT received" in text
        (steady,) = pids(text, "steady")
        with pytest.raises(ProcessLookupError):
            os.kill(steady, 0)


def test_stopping_while_a_process_restarts() -> None:
    """Ctrl-C between a restart and its start report: no KeyError, nothing orphaned."""
    manager = SupervisedManager()
    manager.add_process("starting", "true")
    assert "pid" not in manager._processes["starting"]  # started, pid not reported yet
    manager.terminate()  # honcho's own _killall raised KeyError('pid') here
    assert manager._terminating
