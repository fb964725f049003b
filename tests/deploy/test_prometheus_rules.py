"""deploy/prometheus/: the rules load and their unit tests pass (promtool), the example
config is valid, and every alert is documented and tested both ways."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.dashboard import DASHBOARD, iter_panels, load

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
RULES_TEST = PROMETHEUS / "rules_test.yml"
CONFIG = PROMETHEUS / "prometheus.yml"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH (it comes with Prometheus: apt-get install prometheus)",
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@needs_promtool
def test_rules_load():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_rules_unit_tests_pass():
    proc = promtool("test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_example_config_is_valid():
    # It checks rule_files (rules.yml, relative to the config) too.
    proc = promtool("check", "config", str(CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rules.yml" in proc.stdout


def test_example_config_scrapes_the_runs():
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == ["rules.yml"]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "megabatch"]
    assert job["honor_labels"] is True
    assert job["scrape_interval"] == "15s"
    (sd,) = job["file_sd_configs"]
    assert sd["refresh_interval"]
    for pattern in sd["files"]:
        # Prometheus takes a glob in the last path element only.
        assert "*" not in str(Path(pattern).parent), pattern
        assert pattern.endswith(".json")


def test_groups_are_named():
    names = [group["name"] for group in yaml.safe_load(RULES.read_text())["groups"]]
    assert names == ["megabatch-recording", "megabatch-alerts"]


def test_every_alert_has_severity_summary_and_description():
    found = alerts()
    assert len(found) >= 8
    for rule in found:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        description = annotations.get("description", "")
        assert "megabatch status" in description, name
        assert "dashboard panel" in description, name


def test_every_alert_is_tested_firing_and_silent():
    firing, silent = set(), set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts without a firing case"
    assert names - silent == set(), "alerts without a silent case"
    assert (firing | silent) - names == set(), "tests of alerts that do not exist"


def test_recording_rules_are_evaluated():
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    tested = " ".join(check["expr"] for case in cases for check in case.get("promql_expr_test", []))
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (r for group in groups for r in group["rules"] if "record" in r):
        assert rule["record"] in tested, rule["record"]


def test_annotations_name_dashboard_panels_that_exist():
    titles = {panel["title"] for panel in iter_panels(load(DASHBOARD))}
    for rule in alerts():
        text = re.sub(r"\{\{.*?\}\}", "", rule["annotations"]["description"], flags=re.S)
        named = re.findall(r'"([^"]+)"', text)
        assert named, rule["alert"]
        assert set(named) <= titles, (rule["alert"], set(named) - titles)
