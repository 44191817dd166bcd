"""Alert rules, their Kubernetes copy and the ServiceMonitors: promtool runs the rules' own
tests, and the PrometheusRule is checked to be the rules file, generated."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitoring.render_k8s import PROMETHEUS_RULE, RULES, rendered
from tests.static.test_deploy import matches
from tests.static.test_deploy import rendered as kustomized

ROOT = Path(__file__).parents[2]
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (make gateway-tools)")

# What issue 15 asks the rules to watch, by alert name.
EXPECTED_ALERTS = {
    "EskitDeadLetters",
    "EskitProjectionLagEvents",
    "EskitProjectionLagSeconds",
    "EskitRelayNoLeader",
    "EskitRelayBacklogGrowing",
    "EskitWebhookBreakerOpen",
    "EskitSmtpBreakerOpen",
    "EskitHttpErrorRatio",
    "EskitGatewayErrorRatio",
}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@needs_promtool
def test_the_alert_rules_are_valid_for_promtool() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_alert_rule_passes_its_promtool_unit_tests() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(ROOT / "monitoring" / "alerts.test.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_a_severity_and_a_summary() -> None:
    names = {rule["alert"] for rule in alerts()}
    assert names == EXPECTED_ALERTS
    tested = {
        case["alertname"]
        for test in yaml.safe_load((ROOT / "monitoring" / "alerts.test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == names  # each one seen firing at least once
    for rule in alerts():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_the_prometheus_rule_is_generated_from_the_rules_file() -> None:
    assert PROMETHEUS_RULE.read_text() == rendered(), (
        "k8s/base/prometheus-rule.yaml is stale: run `python monitoring/render_k8s.py`"
    )


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_each_overlay_carries_the_same_rules_and_scrapes_every_process(overlay: str) -> None:
    docs = kustomized(overlay)
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    services = [d for d in docs if d["kind"] == "Service"]
    deployments = [d for d in docs if d["kind"] == "Deployment"]

    def scraped_ports(service: dict[str, Any]) -> set[str]:
        labels = service["metadata"].get("labels", {})
        ports = {p["name"] for p in service["spec"]["ports"]}
        return {
            endpoint["port"]
            for monitor in monitors.values()
            if matches(monitor["spec"]["selector"], labels)
            for endpoint in monitor["spec"]["endpoints"]
            if endpoint["port"] in ports
        }

    # Every process, through its Service's `http` port (the one its /metrics is served on).
    for deployment in deployments:
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        (service,) = [
            s for s in services if matches({"matchLabels": s["spec"]["selector"]}, pod_labels)
        ]
        assert scraped_ports(service) == {"http"}, deployment["metadata"]["name"]
    assert all(e["honorLabels"] for e in monitors["eskit"]["spec"]["endpoints"])
    # Each RabbitMQ node's rabbitmq_prometheus endpoint, enabled in its plugins, exactly once.
    broker = [
        s for s in services if s["spec"]["selector"].get("app.kubernetes.io/name") == "rabbitmq"
    ]
    assert sorted(p for s in broker for p in scraped_ports(s)) == ["prometheus"]
    (config,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rabbitmq-config"
    ]
    assert "rabbitmq_prometheus" in config["data"]["enabled_plugins"]
