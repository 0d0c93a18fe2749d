"""config/prometheus-alerts.yaml: valid for promtool, and each alert fires when (and only when) it should."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus-alerts.yaml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yaml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)


@needs_promtool
def test_promtool_checks_the_rules():
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


@needs_promtool
def test_promtool_rule_tests_pass():
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def alert_metric_names() -> set[str]:
    """The router's metric names the alert expressions use (checked against a real scrape elsewhere)."""
    return set(re.findall(r"\b(dicomrouter_[a-z_]+)", RULES.read_text()))


def test_alerts_cover_what_the_issue_asks():
    text = RULES.read_text()
    for alert in (
        "DicomRouterDestinationDown",
        "DicomRouterOldestPendingOver10Minutes",
        "DicomRouterDeadLetters",
        "DicomRouterSpoolDiskOver90Percent",
        "DicomRouterNotReady",
    ):
        assert f"alert: {alert}" in text
    assert alert_metric_names() >= {"dicomrouter_destination_up", "dicomrouter_ready"}
