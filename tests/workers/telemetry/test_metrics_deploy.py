"""The shipped Prometheus config and Grafana dashboard match what the code exports."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry

from policies.bulkhead import BulkheadSnapshot
from tests.kit import ROOT, breaker_snapshot, service_state
from workers.fleet import FleetSnapshot, HealthResult, QueueState
from workers.ops.supervisor import read_procfile
from workers.telemetry import metrics as m
from workers.telemetry.fleet_metrics import fleet_families

DEPLOY = ROOT / "deploy"


def exported_names() -> set[str]:
    """Every sample and family name a worker or beat can expose."""
    names: set[str] = set()
    for family in m.TaskMetrics(CollectorRegistry()).registry.collect():
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count", "_sum"))
    snapshot = FleetSnapshot(
        taken_at=1.0,
        queues=(QueueState(name="q", ready=1, unacked=1, scheduled=1),),
        breakers=(breaker_snapshot("b", "open"),),
        bulkheads=(
            BulkheadSnapshot(name="b", limit=2, in_use=1, available=1, utilization=0.5, holders=()),
        ),
        services=(service_state("s", "degraded"),),
        deadletters_kept=1,
        deadletters_total=1,
        health={
            "c": HealthResult(
                check="c", status="healthy", message="", latency_seconds=0.0, checked_at=1.0
            )
        },
        health_last_run=1.0,
    )
    for family in fleet_families(snapshot):
        names.update(s.name for s in family.samples)
    return names


class TestDeploy:
    """Dashboard queries name real metrics; Prometheus scrapes the Procfile's ports."""

    def test_dashboard_uses_only_exported_metrics(self) -> None:
        dashboard = json.loads((DEPLOY / "grafana/dashboards/bulwark.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        used = {n for e in exprs for n in re.findall(r"\bbulwark_[a-z_]+", e)}
        assert len(used) >= 15
        assert used <= exported_names(), used - exported_names()

    def test_prometheus_scrapes_every_worker_and_beat_on_its_procfile_port(self) -> None:
        config = (DEPLOY / "prometheus/prometheus.yml").read_text()
        targets = dict(re.findall(r'"(\w+):(\d+)"', config))
        ports = {
            name: re.search(r"BULWARK_HTTP_PORT=(\d+)", command)
            for name, command in read_procfile(ROOT / "Procfile").items()
        }
        served = {name: p.group(1) for name, p in ports.items() if p}
        assert set(served) >= {"worker_payments", "worker_general", "worker_alerts", "beat"}
        assert targets == served
        assert len(set(served.values())) == len(served), "ports are distinct under honcho"
