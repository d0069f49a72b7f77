"""The Procfile is the one list of processes; docker-compose.yml follows it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.kit import ROOT
from workers.supervisor import read_procfile, select

PROCFILE = ROOT / "Procfile"
COMPOSE = (ROOT / "docker-compose.yml").read_text()


def compose_commands() -> dict[str, str]:
    """service -> the Procfile entry its `command` names (services built from the image)."""
    found = re.findall(r"^  (\w+):\n(?:    .*\n)*?    command: \[\"(\w+)\"\]", COMPOSE, re.M)
    return dict(found)


def test_every_process_has_a_compose_service_running_it() -> None:
    processes = read_procfile(PROCFILE)
    assert {"worker_payments", "worker_general", "beat", "flower", "demo"} <= set(processes)
    assert compose_commands() == {name: name for name in processes}


def test_workers_serve_distinct_bulkhead_queues() -> None:
    processes = read_procfile(PROCFILE)
    queues = {
        name: set(re.search(r"-Q (\S+)", cmd).group(1).split(","))  # type: ignore[union-attr]
        for name, cmd in processes.items()
        if name.startswith("worker_")
    }
    assert len(queues) >= 2
    names = list(queues)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not queues[a] & queues[b], f"{a} and {b} share a queue"


def test_flower_credentials_never_on_the_command_line() -> None:
    commands = read_procfile(PROCFILE).values()
    assert not any("basic-auth" in c or "FLOWER_BASIC_AUTH" in c for c in commands)


def test_unknown_process_is_named() -> None:
    with pytest.raises(SystemExit, match="unknown process nope"):
        select(read_procfile(PROCFILE), ["nope"], [])


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose CLI is not installed here",
)
def test_compose_file_validates() -> None:
    done = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={"BULWARK_FLOWER_PASSWORD": "x", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
