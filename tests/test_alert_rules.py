"""deploy/prometheus/cacheport-rules.yml: valid for promtool, every alert complete, and its
unit tests (cacheport-rules.test.yml) pass, with series that fire and series that must not
for every alert."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "cacheport-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "cacheport-rules.test.yml"


def prometheus_binary(name: str) -> str:
    """``prometheus`` or ``promtool`` (Debian package ``prometheus``); the test skips without
    it, and fails under CI=true, whose scripts/bootstrap.sh installs it."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian package 'prometheus')"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must have it: scripts/bootstrap.sh installs it)")
        pytest.skip(message)
    return found


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def test_the_rules_file_passes_promtool_check() -> None:
    result = subprocess.run([prometheus_binary("promtool"), "check", "rules", str(RULES)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_rules_unit_tests_pass() -> None:
    result = subprocess.run([prometheus_binary("promtool"), "test", "rules", RULE_TESTS.name],
                            capture_output=True, text=True, timeout=60, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_duration_a_severity_a_summary_and_a_description() -> None:
    incomplete = [rule["alert"] for rule in alerts()
                  if "for" not in rule
                  or rule.get("labels", {}).get("severity") not in ("critical", "warning")
                  or not rule.get("annotations", {}).get("summary")
                  or not rule.get("annotations", {}).get("description")]
    assert incomplete == []


def test_every_alert_is_tested_both_firing_and_silent() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    # "silent" also counts a case where other series fire but these do not: a test that
    # expects some alerts lists exactly those, so every series it leaves out must not fire.
    names = {rule["alert"] for rule in alerts()}
    assert names - fires == set(), "alerts no test makes fire"
    partial = {check["alertname"] for case in doc["tests"]
               for check in case.get("alert_rule_test", [])
               if check.get("exp_alerts") and len(case["input_series"]) > len(check["exp_alerts"])}
    assert names - silent - partial == set(), "alerts no test keeps silent"


def test_the_alerts_this_issue_asks_for_are_all_there() -> None:
    """A node DOWN, every upstream DOWN, a listener not accepting, refusals, a refused reload,
    a restart loop, descriptors, a certificate, cluster ports: none may go missing."""
    assert {rule["alert"] for rule in alerts()} >= {
        "CacheportDown", "CacheportUpstreamDown", "CacheportListenerAllUpstreamsDown",
        "CacheportListenerNotAccepting", "CacheportRefusalsRising", "CacheportReloadRefused",
        "CacheportWorkerRestartLoop", "CacheportFileDescriptorsHigh",
        "CacheportCertificateExpiresSoon", "CacheportClusterPortsDisagree"}
