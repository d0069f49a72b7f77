"""The shipped Prometheus alert-rules file names real metrics and Bulwark's severities."""

from __future__ import annotations

import re

from tests.kit import ROOT
from tests.workers.telemetry.test_metrics_deploy import exported_names
from workers.telemetry.alerts.model import SEVERITIES

RULES = ROOT / "deploy/prometheus/rules/alert-rules.yml"


def rules() -> list[dict[str, str]]:
    """Each `- alert:` block as {alert, expr, severity} (the file's own flat layout)."""
    blocks = re.split(r"\n\s+- alert: ", RULES.read_text())[1:]
    found = []
    for block in blocks:
        expr = re.search(r"\n\s+expr: (.+)", block)
        severity = re.search(r"\n\s+severity: (\w+)", block)
        summary = re.search(r"\n\s+summary: ", block)
        assert expr and severity and summary, block
        found.append(
            {"alert": block.split("\n", 1)[0], "expr": expr.group(1), "severity": severity.group(1)}
        )
    return found


class TestAlertRulesFile:
    """Every rule has an expression over exported metrics, a known severity and a summary."""

    def test_rules_use_exported_metrics_and_known_severities(self) -> None:
        found = rules()
        names = {r["alert"] for r in found}
        assert {"BulwarkHealthCheckUnhealthy", "BulwarkBreakerOpen", "Watchdog"} <= names
        assert {"BulwarkQueueBacklog", "BulwarkDeadLetterGrowth"} <= names
        used = {m for r in found for m in re.findall(r"\bbulwark_[a-z_]+", r["expr"])}
        assert used <= exported_names(), used - exported_names()
        assert all(r["severity"] in SEVERITIES for r in found)

    def test_file_is_not_tabbed_and_starts_with_groups(self) -> None:
        text = RULES.read_text()
        assert "\t" not in text
        assert re.search(r"^groups:\n  - name: bulwark\n    rules:\n", text, re.M)
