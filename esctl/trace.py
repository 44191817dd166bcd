"""Traces without Jaeger: a small OTLP/HTTP receiver and a compact span-tree printer.

`esctl up --trace` points every process of the stack at the receiver and prints, for each
request, the tree of its spans across processes:

    trace 4bf92f3577b34da6  POST /auth/register  31.2 ms
    └─ POST /auth/register                       auth_svc                12.4 ms
       └─ append auth                            auth_svc                 4.1 ms
          └─ publish auth.events                 auth_svc.relay           1.9 ms
             ├─ user_svc process                 user_svc.consumer        6.0 ms
             └─ reporting_svc process            reporting_svc.consumer   3.2 ms
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
QUIET_PATHS = ("/health", "/metrics", "/status")


@dataclass(frozen=True)
class SpanRecord:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    links: tuple[tuple[str, str], ...] = ()  # (trace id, span id)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


def decode(body: bytes) -> list[SpanRecord]:
    """The spans of an OTLP ExportTraceServiceRequest (protobuf)."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name", "?"))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    SpanRecord(
                        service=service,
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex() or None,
                        kind=KINDS.get(span.kind, str(span.kind)),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        links=tuple((li.trace_id.hex(), li.span_id.hex()) for li in span.links),
                    )
                )
    return spans


class SpanReceiver:
    """Receives OTLP/HTTP trace exports on loopback and keeps every span.

    Point a process at it with `OTEL_EXPORTER_OTLP_ENDPOINT=<receiver.endpoint>`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        on_spans: Callable[[list[SpanRecord]], None] | None = None,
    ) -> None:
        self.spans: list[SpanRecord] = []
        self._lock = threading.Lock()
        self._on_spans = on_spans
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path.rstrip("/") != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._add(decode(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the stack's own logs are what matters on the terminal."""

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> SpanReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> SpanReceiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _add(self, spans: list[SpanRecord]) -> None:
        with self._lock:
            self.spans.extend(spans)
        if self._on_spans is not None:
            self._on_spans(spans)

    def snapshot(self) -> list[SpanRecord]:
        with self._lock:
            return list(self.spans)

    def wait_for(
        self, predicate: Callable[[list[SpanRecord]], bool], timeout: float = 15.0
    ) -> list[SpanRecord]:
        """Every span received once `predicate` holds for them; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"no such spans after {timeout}s; got {len(spans)}")
            time.sleep(0.05)


# --- the tree ---------------------------------------------------------------------------------


def render(spans: Iterable[SpanRecord]) -> list[str]:
    """One trace's spans as an indented tree, children in start order, one line each."""
    spans = sorted(spans, key=lambda s: s.start_ns)
    if not spans:
        return []
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in ids else None
        children.setdefault(parent, []).append(span)
    roots = children.get(None, [])
    first = roots[0]
    total = (max(s.end_ns for s in spans) - min(s.start_ns for s in spans)) / 1e6
    lines = [f"trace {first.trace_id[:16]}  {first.name}  {total:.1f} ms"]
    width = max(len(s.name) for s in spans) + 3 * 6

    def walk(span: SpanRecord, prefix: str, last: bool) -> None:
        branch = "└─ " if last else "├─ "
        label = f"{prefix}{branch}{span.name}"
        linked = f"  ↪ links {len(span.links)}" if span.links else ""
        lines.append(
            f"{label:<{width}} {span.service:<24} {span.duration_ms:>8.1f} ms{linked}".rstrip()
        )
        kids = children.get(span.span_id, [])
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("   " if last else "│  "), i == len(kids) - 1)

    for i, root in enumerate(roots):
        walk(root, "", i == len(roots) - 1)
    return lines


def is_request(spans: Iterable[SpanRecord]) -> bool:
    """A trace worth printing: it holds a request that is not a probe or a scrape."""
    return any(
        s.kind == "server" and not str(s.attributes.get("http.route", "")).startswith(QUIET_PATHS)
        for s in spans
    )


class TracePrinter:
    """Groups received spans by trace; prints each request's tree once it has gone quiet."""

    def __init__(self, write: Callable[[str], None], quiet_seconds: float = 1.5) -> None:
        self._write = write
        self._quiet = quiet_seconds
        self._traces: dict[str, list[SpanRecord]] = {}
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trace-printer", daemon=True)

    def add(self, spans: list[SpanRecord]) -> None:
        now = time.monotonic()
        with self._lock:
            for span in spans:
                self._traces.setdefault(span.trace_id, []).append(span)
                self._seen[span.trace_id] = now

    def start(self) -> TracePrinter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush(force=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.flush()

    def flush(self, *, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            done = [t for t, seen in self._seen.items() if force or now - seen >= self._quiet]
            ready = [self._traces.pop(t) for t in done]
            for t in done:
                del self._seen[t]
        for spans in ready:
            if is_request(spans):
                self._write("\n".join(render(spans)))
