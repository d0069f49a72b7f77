"""The Procfile is the one list of processes; docker-compose.yml follows it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.kit import ROOT, need
from workers.ops.supervisor import ProcfileError, read_procfile, select

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
    with pytest.raises(ProcfileError, match="unknown process nope"):
        select(read_procfile(PROCFILE), ["nope"], [])


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1, Debian's package), if either runs."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_file_validates() -> None:
    cli = compose_cli()
    need(cli, "no docker compose CLI here")
    assert cli is not None
    done = subprocess.run(
        [*cli, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={"BULWARK_FLOWER_PASSWORD": "x", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
