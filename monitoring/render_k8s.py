"""Writes k8s/base/prometheus-rule.yaml from monitoring/alerts.yml: the same alert rules, as a
prometheus-operator PrometheusRule. Run `python monitoring/render_k8s.py` after changing the
rules; tests/static/test_monitoring.py fails while the two differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[1]
RULES = ROOT / "monitoring" / "alerts.yml"
PROMETHEUS_RULE = ROOT / "k8s" / "base" / "prometheus-rule.yaml"
HEADER = (
    "# Generated from monitoring/alerts.yml by `python monitoring/render_k8s.py`: edit that file,\n"
    "# not this one. prometheus-operator loads it (its ruleSelector may want a label, e.g.\n"
    "# `release: <your kube-prometheus-stack release>`: add it in your overlay).\n"
)


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "eskit-alerts", "labels": {"app.kubernetes.io/name": "eskit"}},
        "spec": {"groups": rules["groups"]},
    }


def rendered() -> str:
    rules = yaml.safe_load(RULES.read_text())
    return HEADER + yaml.safe_dump(prometheus_rule(rules), sort_keys=False, width=100)


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(rendered())
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
