"""promtool on the pool's rules: they parse, the shipped Prometheus config loads them, and the
rules' unit tests (deploy/prometheus/rules_test.yml: every alert firing, recorded values) pass."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (bash scripts/dev.sh test installs Debian's prometheus)")
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [("check", "rules", "rules.yml"), ("check", "config", "prometheus.yml"),
                                  ("test", "rules", "rules_test.yml")])
def test_promtool(args: tuple[str, ...]) -> None:
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_and_a_severity() -> None:
    import yaml

    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for case in yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert set(alerts) == tested  # each alert is shown firing in rules_test.yml
    assert all(r["labels"]["severity"] in ("critical", "warning", "info") for r in alerts.values())


def test_dashboard_panels_have_queries_and_use_the_provisioned_datasource() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "specd.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "specd-pool"
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] and t["datasource"]["uid"] == "prometheus"
                                        for t in panel["targets"])
