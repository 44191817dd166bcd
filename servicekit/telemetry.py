"""Tracing: one OpenTelemetry trace from an HTTP request to every projection it causes.

The chain, and who makes each link:

- `web.RequestContextMiddleware` starts a SERVER span, continuing the caller's `traceparent`;
- `eventstore.EventSourcedApplication` wraps each append in a span and stores *that* span's
  traceparent in every appended event's metadata;
- the relay starts a PRODUCER span per message whose parent is the stored traceparent (not
  the relay's own context: a backlog published an hour later still joins its request) and
  puts the new span's traceparent in the message's headers;
- a consumer starts a CONSUMER span per message from that header (a batch span links them);
- a replay's span is a new trace that *links* to each message's original context.

Configuration is the standard `OTEL_*` environment: `OTEL_SDK_DISABLED`, `OTEL_SERVICE_NAME`,
`OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`), `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (OTLP over HTTP/protobuf), `OTEL_TRACES_SAMPLER`,
`OTEL_BSP_*`. With no endpoint (and no console exporter) nothing is exported and nothing is
recorded: spans are non-recording, which costs a couple of microseconds for ids, yet trace
and span ids still reach the logs and the stored events, so the chain can be followed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("servicekit.telemetry")

Context = otel_context.Context

__all__ = [
    "Context",
    "Link",
    "Span",
    "SpanKind",
    "StatusCode",
    "configure_tracing",
    "context_from_traceparent",
    "current_ids",
    "current_traceparent",
    "exporting_to",
    "link_to",
    "metrics_enabled",
    "start_span",
    "traceparent_of",
    "use_span",
]


class TelemetrySettings(BaseSettings):
    """The standard OpenTelemetry variables we act on, and our switch for request metrics."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    sdk_disabled: bool = Field(False, validation_alias=AliasChoices("OTEL_SDK_DISABLED"))
    service_name: str | None = Field(None, validation_alias=AliasChoices("OTEL_SERVICE_NAME"))
    traces_exporter: str = Field("otlp", validation_alias=AliasChoices("OTEL_TRACES_EXPORTER"))
    otlp_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    otlp_traces_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    otlp_protocol: str = Field(
        "http/protobuf", validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_PROTOCOL")
    )
    # Per-request and per-message metric updates (the `/metrics` endpoint always answers).
    metrics_enabled: bool = Field(True, validation_alias=AliasChoices("METRICS_ENABLED"))
    # How often consumers poll their queue and dead-letter queue depths.
    queue_poll_seconds: float = Field(
        5.0, validation_alias=AliasChoices("METRICS_QUEUE_POLL_SECONDS")
    )


@dataclass
class _State:
    tracer: trace.Tracer
    provider: TracerProvider | None
    service: str | None
    exporting: bool
    metrics: bool
    queue_poll_seconds: float


_NOOP = trace.NoOpTracer()
_state = _State(
    tracer=_NOOP, provider=None, service=None, exporting=False, metrics=True, queue_poll_seconds=5
)
_propagator = TraceContextTextMapPropagator()


def configure_tracing(
    service: str,
    *,
    exporter: SpanExporter | None = None,
    settings: TelemetrySettings | None = None,
) -> bool:
    """Set up this process's tracing once; True when spans are exported somewhere.

    Later calls keep the first configuration, except when a test passes its own `exporter`
    (e.g. the SDK's in-memory exporter), which always replaces it.
    """
    if _state.service is not None and exporter is None:
        return _state.exporting
    settings = settings or TelemetrySettings()
    _state.metrics = settings.metrics_enabled
    _state.queue_poll_seconds = settings.queue_poll_seconds
    _state.service = service
    if settings.sdk_disabled and exporter is None:
        _state.tracer, _state.provider, _state.exporting = _NOOP, None, False
        return False
    exporters = [exporter] if exporter is not None else _exporters(settings)
    resource = Resource.create(
        {} if settings.service_name else {SERVICE_NAME: service}  # OTEL_SERVICE_NAME wins
    )
    if exporters:
        provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
        for each in exporters:
            provider.add_span_processor(BatchSpanProcessor(each))
    else:
        # Nothing to export: record nothing unless an upstream sampled the trace, but still
        # make ids so that logs and stored events carry them.
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
    if _state.provider is None:
        trace.set_tracer_provider(provider)
    _state.provider = provider
    _state.tracer = provider.get_tracer("servicekit")
    _state.exporting = bool(exporters)
    return _state.exporting


def _exporters(settings: TelemetrySettings) -> list[SpanExporter]:
    found: list[SpanExporter] = []
    for name in (n.strip().lower() for n in settings.traces_exporter.split(",")):
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            found.append(ConsoleSpanExporter())
        elif name == "otlp":
            if not (settings.otlp_traces_endpoint or settings.otlp_endpoint):
                continue  # no endpoint: no exporter, near-zero cost
            if not settings.otlp_protocol.startswith("http"):
                log.warning(
                    "only OTLP over HTTP (http/protobuf) is supported; using it",
                    extra={"protocol": settings.otlp_protocol},
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # It reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT itself.
            found.append(OTLPSpanExporter())
        elif name not in ("none", ""):
            log.warning("unknown OTEL_TRACES_EXPORTER ignored", extra={"exporter": name})
    return found


@contextmanager
def exporting_to(exporter: SpanExporter) -> Iterator[None]:
    """Record every span of this process to `exporter` for a block (tests, in-process).

    Spans are exported as they end; the previous configuration comes back afterwards.
    """
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    saved = (_state.tracer, _state.provider, _state.exporting)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: _state.service or "test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _state.tracer, _state.provider, _state.exporting = (
        provider.get_tracer("servicekit"),
        provider,
        True,
    )
    try:
        yield
    finally:
        provider.shutdown()
        _state.tracer, _state.provider, _state.exporting = saved


def metrics_enabled() -> bool:
    return _state.metrics


def queue_poll_seconds() -> float:
    return _state.queue_poll_seconds


# --- spans ------------------------------------------------------------------------------------


def start_span(
    name: str,
    *,
    parent: otel_context.Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes = None,
    links: Sequence[Link] | None = None,
) -> Span:
    """A span (not made current) under `parent`, or under the current span when None."""
    return _state.tracer.start_span(
        name, context=parent, kind=kind, attributes=attributes, links=links
    )


@contextmanager
def use_span(span: Span, *, end: bool = True) -> Iterator[Span]:
    """Make `span` current for a block; an escaping exception marks it as an error."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as exc:
        if span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        otel_context.detach(token)
        if end:
            span.end()


def attach(span: Span) -> object:
    """Make `span` current until `detach(token)` (for code that cannot use a `with`)."""
    return otel_context.attach(trace.set_span_in_context(span))


def detach(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]


def context_from_traceparent(traceparent: str | None) -> otel_context.Context | None:
    """The context a W3C `traceparent` names, as a parent for a new span (None if absent).

    An empty context (not None) for a malformed value, so that a bad header starts a new
    trace rather than joining whatever span happens to be current.
    """
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent}, context=otel_context.Context())


def traceparent_of(span_context: SpanContext) -> str | None:
    if not span_context.is_valid:
        return None
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{int(span_context.trace_flags) & 0xFF:02x}"
    )


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None when there is none."""
    return traceparent_of(trace.get_current_span().get_span_context())


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span, in hex, for log lines."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def link_to(traceparent: str | None, attributes: Attributes = None) -> Link | None:
    """A span link to the span a `traceparent` names (for replays and batches)."""
    parent = context_from_traceparent(traceparent)
    if parent is None:
        return None
    span_context = trace.get_current_span(parent).get_span_context()
    if not span_context.is_valid:
        return None
    return Link(span_context, attributes)
