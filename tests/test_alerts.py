"""The router's alerts, unit-tested with `promtool test rules` on synthetic series.

k8s/base/router-prometheusrule.yaml is a PrometheusRule object; its `spec` is a Prometheus rule
file. The test extracts it beside a copy of k8s/tests/alerts-test.yaml and runs promtool, which
checks every alert fires when it should and stays silent when it should not (no pods at all, a
pod removed, blips, streams). promtool comes from Debian's `prometheus` package; without it the
test is skipped and says so (CI installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "k8s" / "base" / "router-prometheusrule.yaml"
ALERT_TESTS = ROOT / "k8s" / "tests" / "alerts-test.yaml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus): "
                    "the alert unit tests in k8s/tests/alerts-test.yaml did not run")
    return found


def alerts_in(rule_file: dict) -> set[str]:
    return {r["alert"] for g in rule_file["groups"] for r in g["rules"] if "alert" in r}


def alerts_under_test(tests: dict) -> set[str]:
    return {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", [])}


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    spec = yaml.safe_load(RULE.read_text())["spec"]
    (tmp_path / "router-rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    return tmp_path


def test_every_alert_has_a_unit_test_that_fires_and_one_that_stays_silent():
    rules = yaml.safe_load(RULE.read_text())["spec"]
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert alerts_in(rules) == alerts_under_test(tests)
    for alert in alerts_in(rules):
        cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])
                 if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in cases), f"{alert}: no test where it fires"
        assert any(not c["exp_alerts"] for c in cases), f"{alert}: no test where it is silent"


def test_alert_rules_pass_promtool_check_and_unit_tests(rules_dir: Path):
    binary = promtool()
    check = subprocess.run([binary, "check", "rules", "router-rules.yaml"], cwd=rules_dir,
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run([binary, "test", "rules", ALERT_TESTS.name], cwd=rules_dir,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_catch_a_rule_that_cannot_fire_without_pods(rules_dir: Path):
    """The tests are not vacuous: the old per-pod sum (empty with no pods) fails them."""
    binary = promtool()
    path = rules_dir / "router-rules.yaml"
    spec = yaml.safe_load(path.read_text())
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "MacpRouterNoHealthyPods":
                rule["expr"] = "sum by (namespace, router_pod) (macp_router_pod_healthy) == 0"
    path.write_text(yaml.safe_dump(spec))
    result = subprocess.run([binary, "test", "rules", ALERT_TESTS.name], cwd=rules_dir,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "a router with no pods at all fires MacpRouterNoHealthyPods" in output


def test_every_alert_links_its_runbook_with_a_full_url():
    rule = yaml.safe_load(RULE.read_text())
    base = rule["metadata"]["annotations"]["macp-router/runbook-base-url"]
    assert base.startswith("https://")
    anchors = {line.lstrip("#").strip().lower().replace(" ", "-").replace(":", "")
               for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
               if line.startswith("### Runbook")}
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            url = alert["annotations"]["runbook_url"]
            page, _, anchor = url.partition("#")
            assert page == base, alert["alert"]
            assert anchor in anchors, (alert["alert"], anchor)
            assert "runbook" not in alert["annotations"], "runbook_url is the convention"
