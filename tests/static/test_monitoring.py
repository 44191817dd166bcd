"""Alert rules, their Kubernetes copy and the ServiceMonitors: promtool runs the rules' own
tests, and the PrometheusRule is checked to be the rules file, generated."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import registry
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


# --- docker-compose's observability profile -----------------------------------------------

COMPOSE_DIR = ROOT / "compose"


def observability() -> dict[str, dict[str, Any]]:
    services = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())["services"]
    return {n: s for n, s in services.items() if "observability" in s.get("profiles", [])}


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts (relative to compose/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE_DIR / source).resolve()
    return out


def test_the_observability_profile_sends_traces_to_jaeger_not_only_a_debug_sink() -> None:
    profile = observability()
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(profile)
    assert all(s["healthcheck"]["test"] for s in profile.values())
    collector = yaml.safe_load((COMPOSE_DIR / "otel-collector.yaml").read_text())
    (pipeline,) = collector["service"]["pipelines"].values()
    exporters = [e for e in pipeline["exporters"] if not e.startswith("debug")]
    assert exporters, "traces only reach a debug sink"
    for name in exporters:
        endpoint = collector["exporters"][name]["endpoint"]
        host, port = endpoint.rsplit(":", 1)
        assert host == "jaeger" and port == "4317"  # Jaeger's OTLP/gRPC receiver
    assert profile["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert profile["otel-collector"]["depends_on"]["jaeger"]["condition"] == "service_healthy"


@needs_promtool
def test_compose_prometheus_loads_the_rules_and_scrapes_every_process_rabbitmq_and_kong(
    tmp_path: Path,
) -> None:
    services = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())["services"]
    prometheus = observability()["prometheus"]
    files = mounts(prometheus)
    config = yaml.safe_load(files["/etc/prometheus/prometheus.yml"].read_text())
    assert [files[r] for r in config["rule_files"]] == [RULES.resolve()]
    # promtool accepts the configuration, with the rules where the container sees them.
    local = {**config, "rule_files": [str(RULES)]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(local))
    checked = subprocess.run(
        [str(PROMTOOL), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    # Each process of the registry: its own job, on the port compose tells it to listen on.
    for process in registry.processes():
        (target,) = targets[process.name]
        host, port = target.rsplit(":", 1)
        assert services[host]["environment"][process.port_variable] == port, process.name
    nodes = [n for n, s in services.items() if str(s.get("image", "")).startswith("rabbitmq:")]
    assert sorted(targets["rabbitmq"]) == sorted(f"{n}:15692" for n in nodes)
    status = services["kong"]["environment"]["KONG_STATUS_LISTEN"].rsplit(":", 1)[1]
    assert targets["kong"] == [f"kong:{status}"]


def test_grafana_is_provisioned_with_prometheus_jaeger_and_the_dashboard() -> None:
    grafana = observability()["grafana"]
    files = mounts(grafana)
    provisioning = files["/etc/grafana/provisioning"]
    sources = {
        d["uid"]: d
        for f in (provisioning / "datasources").glob("*.yml")
        for d in yaml.safe_load(f.read_text())["datasources"]
    }
    assert sources["prometheus"]["url"] == "http://prometheus:9090"
    assert sources["jaeger"]["type"] == "jaeger"
    assert sources["jaeger"]["url"] == "http://jaeger:16686"
    (provider,) = [
        p
        for f in (provisioning / "dashboards").glob("*.yml")
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    dashboards = files[provider["options"]["path"]]
    assert dashboards == (ROOT / "monitoring" / "grafana").resolve()
    dashboard = json.loads((dashboards / "eskit.json").read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row"} | {
        v["datasource"]["uid"] for v in dashboard["templating"]["list"]
    }
    assert used <= set(sources)
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == (
        f"{provider['options']['path']}/eskit.json"
    )
