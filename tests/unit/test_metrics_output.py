"""What /metrics serves: the series dashboards and alerts read, and no `*_created` ones."""

from __future__ import annotations

from fastapi.testclient import TestClient

import servicekit.consumer
from servicekit import web


def test_metrics_have_no_created_series() -> None:
    client = TestClient(web.create_app(title="metrics-test"))
    assert client.get("/health/live").status_code == 200
    servicekit.consumer.MESSAGES.labels("metrics-test", "applied").inc()
    text = client.get("/metrics").text
    samples = [line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"]
    assert "http_requests_total" in samples
    assert "http_request_duration_seconds_count" in samples
    assert "consumer_messages_total" in samples
    assert [s for s in samples if s.endswith("_created")] == []
