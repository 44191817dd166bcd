"""The Grafana dashboard and the alert rules name only metrics the processes really export:
every query's metric names against the `/metrics` of the stack started by `esctl up`."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

import registry
from testbed.up import EsctlUp, esctl_up

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana" / "eskit.json"
RULES = ROOT / "monitoring" / "alerts.yml"
PROCESSES = {p.name: p.port_variable for p in registry.processes()}
# Kong's own metrics (prometheus plugin): Kong cannot run here; only the gateway alert uses them.
KONG_PREFIX = "kong_"

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(...)`) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,[^)]*\)", r"\1", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)(?!\w)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_WORDS or re.fullmatch(r"\d+\w*", name):
            continue
        names.add(name)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_metric_names_are_read_from_promql_as_prometheus_reads_them() -> None:
    expr = (
        'sum by (job) (rate(http_requests_total{status=~"5..", route!~"/health/.*"}[5m]))'
        " / on (job) group_left () max by (le) (relay_is_leader offset 5m) > bool 0.5"
        " and histogram_quantile(0.95, sum by (le) (rate(x_seconds_bucket[$__rate_interval])))"
        ' or (time() - consumer_position) > 1e3 unless absent(y_total{a="b"})'
    )
    assert metric_names(expr) == {
        "http_requests_total",
        "relay_is_leader",
        "x_seconds_bucket",
        "consumer_position",
        "y_total",
    }
    assert metric_names("label_values(consumer_messages_total, service)") == {
        "consumer_messages_total"
    }


def test_every_dashboard_panel_queries_prometheus_and_names_a_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert metric_names(target["expr"]), (panel["title"], target["expr"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def exported(text: str) -> dict[str, int]:
    """Each series name a /metrics text can hold, with its number of samples: a histogram's
    `_bucket`, `_sum` and `_count` included (declared families count, with 0 samples)."""
    names: dict[str, int] = {}
    for line in text.splitlines():
        if match := re.match(r"# TYPE (\S+) (\w+)", line):
            name, kind = match.groups()
            suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
            for series in (name, *(name + s for s in suffixes.get(kind, ()))):
                names.setdefault(series, 0)
        elif line and not line.startswith("#"):
            series = re.split(r"[{ ]", line, maxsplit=1)[0]
            names[series] = names.get(series, 0) + 1
    return names


@pytest.fixture(scope="module")
def stack(
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EsctlUp]:
    with esctl_up(
        make_database,
        make_vhost,
        tmp_path_factory.mktemp("dashboard"),
        # Eight Python processes on two shared cores may take more than the default 60 s.
        up_args=("--no-gateway", "--ready-timeout", "85"),
        METRICS_QUEUE_POLL_SECONDS="0.5",
    ) as running:
        yield running


def drive(stack: EsctlUp) -> None:
    """Traffic that makes most series appear: a registration (mail, profile, projections), a
    login, a failed login, a profile read."""
    email = f"dash-{uuid.uuid4().hex[:8]}@example.com"
    password = "correct horse battery staple"
    with httpx.Client(timeout=10) as http:
        r = http.post(f"{stack.auth}/auth/register", json={"email": email, "password": password})
        assert r.status_code == 201, r.text
        login = http.post(f"{stack.auth}/auth/login", json={"email": email, "password": password})
        assert login.status_code == 200, login.text
        bad = http.post(f"{stack.auth}/auth/login", json={"email": email, "password": "nope!"})
        assert bad.status_code == 401
        token = login.json()["access_token"]
        deadline = time.monotonic() + 30
        while True:
            me = http.get(f"{stack.users}/users/me", headers={"Authorization": f"Bearer {token}"})
            if me.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert me.status_code == 200, me.text


def scraped(stack: EsctlUp) -> dict[str, dict[str, int]]:
    out = {}
    with httpx.Client(timeout=5) as http:
        for name, variable in PROCESSES.items():
            r = http.get(f"{stack.url(variable)}/metrics")
            assert r.status_code == 200, name
            out[name] = exported(r.text)
    return out


def test_every_metric_the_dashboard_and_the_alerts_name_is_exported_by_a_process(
    stack: EsctlUp,
) -> None:
    drive(stack)
    # The consumers have applied the registration and polled their queue depths.
    deadline = time.monotonic() + 30
    while True:
        metrics = scraped(stack)
        reporting = metrics["reporting_svc.consumer"]
        if reporting.get("consumer_last_event_occurred_timestamp_seconds") and reporting.get(
            "consumer_dlq_messages"
        ):
            break
        assert time.monotonic() < deadline, sorted(reporting)
        time.sleep(0.5)
    everywhere: dict[str, int] = {}
    for names in metrics.values():
        for name, samples in names.items():
            everywhere[name] = everywhere.get(name, 0) + samples

    wanted = {n for q in dashboard_queries() for n in metric_names(q)}
    in_rules = {n for q in rule_queries() for n in metric_names(q)}
    wanted |= {n for n in in_rules if not n.startswith(KONG_PREFIX)}
    assert {n for n in in_rules if n.startswith(KONG_PREFIX)} == {"kong_http_requests_total"}
    missing = sorted(wanted - set(everywhere))
    assert missing == [], f"named in monitoring/ but exported by no process: {missing}"
    # Most of them with samples already, after one registration (the rest are declared and
    # fill in with their first webhook, failed mail, open breaker...).
    with_samples = {n for n in wanted if everywhere[n] > 0}
    assert {
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "auth_logins_total",
        "eventstore_events_appended_total",
        "relay_published_total",
        "relay_is_leader",
        "relay_backlog_events",
        "consumer_messages_total",
        "consumer_lag_events",
        "consumer_dlq_messages",
        "consumer_last_event_occurred_timestamp_seconds",
        "notify_smtp_breaker_open",
    } <= with_samples
