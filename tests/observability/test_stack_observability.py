"""Traces, metrics and logs of the real stack: `esctl up` processes exporting over OTLP to a
receiver this test runs, scraped with promtool, their stderr read line by line."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import registry
from esctl.trace import SpanReceiver, SpanRecord, render
from reporting_svc.projection import ReportingProjection
from servicekit import telemetry
from servicekit.replay import Replay
from testbed.up import EsctlUp, esctl_up
from tests.support.amqp import subscribed

PASSWORD = "correct horse battery staple"
# Each process `esctl up --no-gateway` starts, by the variable that sets its port.
PROCESSES = {p.name: p.port_variable for p in registry.processes()}


@dataclass
class TracedStack:
    running: EsctlUp
    receiver: SpanReceiver

    @property
    def env(self) -> dict[str, str]:
        return self.running.env

    def url(self, name: str) -> str:
        return self.running.url(PROCESSES[name])

    def log_lines(self) -> list[str]:
        return [line for line in self.running.log.read_text().splitlines() if line.strip()]


@dataclass
class Registered:
    request_id: str
    email: str
    user_id: str
    tokens: dict[str, str]
    trace_id: str
    envelopes: list[dict[str, object]]


@pytest.fixture(scope="module")
def stack(
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TracedStack]:
    work = tmp_path_factory.mktemp("stack")
    with (
        SpanReceiver() as receiver,
        esctl_up(
            make_database,
            make_vhost,
            work,
            up_args=("--no-gateway",),
            LOG_LEVEL="DEBUG",  # every line there is, the access log included
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
            METRICS_QUEUE_POLL_SECONDS="0.5",
        ) as running,
    ):
        yield TracedStack(running, receiver)


def trace_of(spans: list[SpanRecord], trace_id: str) -> list[SpanRecord]:
    return [s for s in spans if s.trace_id == trace_id]


def one(spans: list[SpanRecord], service: str, name: str) -> SpanRecord:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
    return found[0]


@pytest.fixture(scope="module")
def registered(stack: TracedStack) -> Registered:
    """One register request (and a login) with a known X-Request-ID, and its whole trace."""
    request_id = f"obs-{uuid.uuid4().hex[:12]}"
    email = f"obs-{uuid.uuid4().hex[:8]}@example.com"

    async def scenario() -> tuple[httpx.Response, dict[str, str], list[dict[str, object]]]:
        async with (
            subscribed(stack.env["AMQP_URL"], "user.events") as user_events,
            httpx.AsyncClient(timeout=10) as http,
        ):
            r = await http.post(
                f"{stack.url('auth_svc')}/auth/register",
                json={"email": email, "password": PASSWORD, "display_name": "Ada"},
                headers={"X-Request-ID": request_id},
            )
            assert r.status_code == 201, r.text
            login = await http.post(
                f"{stack.url('auth_svc')}/auth/login",
                json={"email": email, "password": PASSWORD},
                headers={"X-Request-ID": f"{request_id}-login"},
            )
            assert login.status_code == 200, login.text
            bad = await http.post(
                f"{stack.url('auth_svc')}/auth/login", json={"email": email, "password": "wrong!"}
            )
            assert bad.status_code == 401
            tokens = login.json()
            # The registration creates the profile; a GET first would create it instead.
            created = await user_events.wait_for(1)
            me = await http.get(
                f"{stack.url('user_svc')}/users/me",
                headers={"Authorization": f"Bearer {tokens['access_token']}"},
            )
            assert me.status_code == 200, me.text
            return r, tokens, created

    r, tokens, envelopes = asyncio.run(scenario())
    assert r.headers["x-request-id"] == request_id

    def complete(spans: list[SpanRecord]) -> bool:
        # The spans the tests read, by name: a consumer's `append` child ends, and may be
        # exported, before its `process` span does, so a service's first span is not enough.
        server = [s for s in spans if s.attributes.get("http.request_id") == request_id]
        if not server:
            return False
        named = {(s.service, s.name) for s in trace_of(spans, server[0].trace_id)}
        return {
            ("auth_svc.relay", "publish auth.events"),
            ("user_svc.consumer", "user_svc process"),
            ("user_svc.consumer", "append users"),
            ("user_svc.relay", "publish user.events"),
            ("reporting_svc.consumer", "reporting_svc process"),
        } <= named

    spans = stack.receiver.wait_for(complete, timeout=30)
    server = next(s for s in spans if s.attributes.get("http.request_id") == request_id)
    return Registered(request_id, email, r.json()["user_id"], tokens, server.trace_id, envelopes)


def test_one_register_request_is_one_trace_from_http_to_every_projection(
    stack: TracedStack, registered: Registered
) -> None:
    spans = trace_of(stack.receiver.snapshot(), registered.trace_id)

    request = one(spans, "auth_svc", "POST /auth/register")
    append = one(spans, "auth_svc", "append auth")
    published = [s for s in spans if s.service == "auth_svc.relay"]
    profile = one(spans, "user_svc.consumer", "user_svc process")
    # reporting_svc consumes the registration and, later, the profile it caused.
    reporting = one(
        [s for s in spans if s.parent_id == published[0].span_id],
        "reporting_svc.consumer",
        "reporting_svc process",
    )

    assert request.kind == "server" and request.parent_id is None
    assert append.parent_id == request.span_id
    # One append, one registered event: the relay's span starts from the stored traceparent.
    assert [s.parent_id for s in published] == [append.span_id]
    assert published[0].kind == "producer"
    assert profile.parent_id == published[0].span_id
    assert reporting.parent_id == published[0].span_id
    assert profile.kind == reporting.kind == "consumer"
    assert reporting.attributes["eskit.outcome"] == "applied"
    # The chain goes on: user_svc appends the profile, its relay publishes it, in this trace.
    profile_append = one(spans, "user_svc.consumer", "append users")
    assert profile_append.parent_id == profile.span_id
    assert any(
        s.service == "user_svc.relay" and s.parent_id == profile_append.span_id for s in spans
    )

    # The tree `esctl up --trace` prints, on these very spans.
    tree = render(spans)
    assert tree[0].startswith(f"trace {registered.trace_id[:16]}  POST /auth/register")
    assert tree[1].startswith("└─ POST /auth/register")
    for line in ("append auth", "publish auth.events", "user_svc process", "reporting_svc process"):
        assert any(line in row for row in tree), (line, tree)
    depth = {
        row.split("─ ", 1)[1].split("  ")[0]: len(row) - len(row.lstrip("│ ├└")) for row in tree[1:]
    }
    assert depth["append auth"] > depth["POST /auth/register"]
    assert depth["user_svc process"] > depth["publish auth.events"] > depth["append auth"]


def test_correlation_and_causation_follow_the_same_chain(registered: Registered) -> None:
    created = registered.envelopes[0]
    assert created["event_type"] == "user.profile.created"
    assert created["correlation_id"] == registered.request_id
    # Caused by auth.account.registered, whose event id is deterministic; check its shape.
    assert created["causation_id"] != registered.request_id
    uuid.UUID(str(created["causation_id"]))


def test_a_replayed_projection_span_links_to_the_original_trace(
    stack: TracedStack, registered: Registered
) -> None:
    exporter = InMemorySpanExporter()
    with telemetry.exporting_to(exporter):
        replay = Replay(
            ReportingProjection(),
            database_url=stack.env["REPORTING_DATABASE_URL"],
            amqp_url=stack.env["AMQP_URL"],
            dry_run=True,
            idle_seconds=0.5,
        )
        result = asyncio.run(replay.run(asyncio.Event()))
    assert result.progress.applied >= 1
    replays = [s for s in exporter.get_finished_spans() if s.name == "replay reporting_svc"]
    assert replays, [s.name for s in exporter.get_finished_spans()]
    for span in replays:
        # A trace of its own, not a child of the request it replays...
        assert span.parent is None
        assert span.context.trace_id != int(registered.trace_id, 16)
    # ...that links to the request's trace.
    linked = {f"{link.context.trace_id:032x}" for s in replays for link in s.links}
    assert registered.trace_id in linked


def scrape(stack: TracedStack, name: str) -> str:
    r = httpx.get(f"{stack.url(name)}/metrics", timeout=5)
    assert r.status_code == 200
    return r.text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (make gateway-tools)")
def test_every_process_serves_metrics_that_promtool_accepts(
    stack: TracedStack, registered: Registered
) -> None:
    for name in PROCESSES:
        text = scrape(stack, name)
        checked = subprocess.run(
            ["promtool", "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"

    auth = scrape(stack, "auth_svc")
    assert 'auth_logins_total{outcome="succeeded"} 1.0' in auth
    assert 'auth_logins_total{outcome="failed"} 1.0' in auth
    assert (
        'eventstore_events_appended_total{app="auth",event_type="Account.Registered"} 1.0' in auth
    )
    assert 'http_requests_total{method="POST",route="/auth/register",status="201"} 1.0' in auth
    assert "relay_published_total" in scrape(stack, "auth_svc.relay")
    reporting = scrape(stack, "reporting_svc.consumer")
    for metric in ("consumer_messages_total", "consumer_lag_events", "consumer_dlq_messages"):
        assert f"{metric}{{" in reporting, metric
    for text in (auth, reporting):
        assert registered.email not in text and registered.user_id not in text


def test_log_lines_are_json_with_request_and_trace_ids_and_no_secret(
    stack: TracedStack, registered: Registered
) -> None:
    lines = stack.log_lines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line[:300]}")
    assert {"ts", "level", "service", "message"} <= set(parsed[0])
    ours = [p for p in parsed if p.get("request_id") == registered.request_id]
    assert {p["service"] for p in ours} >= {"auth_svc"}
    assert all(p.get("trace_id") == registered.trace_id and p.get("span_id") for p in ours)

    secrets = {
        "the password": PASSWORD,
        "an argon2 hash": "$argon2",
        "the access token": registered.tokens["access_token"],
        "the token's signature": registered.tokens["access_token"].rsplit(".", 1)[-1],
        "the refresh token": registered.tokens["refresh_token"],
    }
    leaks = [f"{what}: {line[:200]}" for line in lines for what, s in secrets.items() if s in line]
    assert leaks == []
    emails_at_info = [
        line
        for line, p in zip(lines, parsed, strict=True)
        if p["level"] != "debug" and registered.email in line
    ]
    assert emails_at_info == []
