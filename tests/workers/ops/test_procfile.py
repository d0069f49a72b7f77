"""The Procfile is the one list of processes; docker-compose.yml follows it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import tasks.catalogue  # noqa: F401  (declares the catalogue's balanced tasks)
from tests.kit import ROOT, need
from workers import balancing
from workers.ops.acl import users
from workers.ops.supervisor import ProcfileError, read_procfile, select, served_queues

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


def test_every_shard_of_a_balanced_task_is_served_and_in_the_acl() -> None:
    """A balanced task's target queues are not bulkhead queues of the settings: a worker
    entry must consume each, and `bulwark up`'s ACL users (built from what the entries
    consume) must reach each."""
    served = served_queues(read_procfile(PROCFILE))
    targets = set(balancing.declared()["shipping.label"].targets)  # the catalogue's
    assert {"shipping.0", "shipping.1"} == targets <= set(served)
    producer = next(u for u in users(served) if u.name == "producer")
    assert "~shipping.0" in producer.rules and "~shipping.1" in producer.rules


def test_pooled_workers_autoscale_within_their_bulkheads() -> None:
    processes = read_procfile(PROCFILE)
    bounds = {
        name: re.search(r"--autoscale=(\d+),(\d+)", cmd)
        for name, cmd in processes.items()
        if name.startswith("worker_") and "--concurrency=1" not in cmd
    }
    assert set(bounds) >= {"worker_payments", "worker_general"}
    for name, found in bounds.items():
        assert found, f"{name} runs without --autoscale=MAX,MIN"
        assert int(found[1]) >= int(found[2]) >= 1, name
    assert bounds["worker_payments"][1] == "4"  # type: ignore[index]  # the payments bulkhead


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


@pytest.mark.parametrize("profile", [None, "sentinel", "rabbitmq"])
def test_compose_file_validates(profile: str | None) -> None:
    """The default fleet, and each engine's profile with its env file (`deploy/compose`)."""
    cli = compose_cli()
    need(cli, "no docker compose CLI here")
    assert cli is not None
    extra = []
    if profile is not None:
        extra = ["--env-file", str(ROOT / "deploy" / "compose" / f"{profile}.env"),
                 "--profile", profile]  # fmt: skip
    done = subprocess.run(
        [*cli, "-f", str(ROOT / "docker-compose.yml"), *extra, "config"],
        capture_output=True,
        text=True,
        env={"BULWARK_FLOWER_PASSWORD": "x", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    if profile is not None:  # the fleet's URLs point at the profile's engine
        assert ("sentinel://sentinel-1:26379" if profile == "sentinel"
                else "amqp://bulwark:bulwark@rabbitmq:5672/bulwark") in done.stdout  # fmt: skip


def test_kubernetes_runs_and_keda_scales_every_worker_group() -> None:
    """deploy/kubernetes: a Deployment per Procfile worker group, on the port its entry sets,
    and a KEDA ScaledObject reading that group's desired count from beat's /scaling."""
    documents = (ROOT / "deploy" / "kubernetes" / "workers.yaml").read_text().split("\n---\n")
    processes = read_procfile(PROCFILE)
    for name, command in processes.items():
        if not name.startswith("worker_"):
            continue
        port = re.search(r"BULWARK_HTTP_PORT=(\d+)", command)
        deployment = [d for d in documents if "kind: Deployment" in d and f'["{name}"]' in d]
        assert len(deployment) == 1, f"no Deployment runs {name}"
        assert port and f"containerPort: {port[1]}" in deployment[0], name
        scaled = [d for d in documents if f'valueLocation: "groups.{name}.desired"' in d]
        assert len(scaled) == 1 and "kind: ScaledObject" in scaled[0], f"KEDA does not scale {name}"
        assert 'url: "http://bulwark-beat:9100/scaling"' in scaled[0]
    beat = (ROOT / "deploy" / "kubernetes" / "beat.yaml").read_text()
    assert "replicas: 2" in beat and "containerPort: 9100" in beat
    assert "BULWARK_HTTP_PORT=9100" in processes["beat"]
