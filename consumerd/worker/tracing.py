"""OpenTelemetry tracing in the workers (the extra `consumerd[otel]`, with `[tracing] enabled = true`).

The publisher's W3C trace context travels in the message's attributes: python-pubsub writes
`googclient_traceparent` / `googclient_tracestate`, other publishers a plain `traceparent`. Around
each task the worker starts a CONSUMER span `<subscription> process` as that context's child, with
the OpenTelemetry messaging attributes, and makes it current while the task runs, so the task's own
spans and its log events (`trace_id`) join the publisher's trace. The exporter is the one the
standard `OTEL_TRACES_EXPORTER` names (otlp when its package is installed, console, or none). With
tracing off or the SDK missing, `task_span` only binds the task's log context: every event logged
while it runs carries `subscription`, `task` and `message_id` (the `gcp` format's labels).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import structlog
from structlog.stdlib import BoundLogger

from consumerd.message import Message

_tracer: Any = None
_provider: Any = None


def configure(enabled: bool, log: BoundLogger) -> None:
    """In the fork server, before any worker is forked (the SDK re-arms its threads after fork)."""
    global _tracer, _provider
    if not enabled:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing.unavailable", detail="tracing.enabled needs the OpenTelemetry SDK: pip install 'consumerd[otel]'")
        return
    _provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "consumerd")}))
    exporter = _exporter(os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip(), log)
    if exporter is not None:
        _provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(_provider)
    _tracer = trace.get_tracer("consumerd")


def _exporter(name: str, log: BoundLogger) -> Any:
    if name == "none":
        return None
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("tracing.no_exporter", exporter=name, detail="install opentelemetry-exporter-otlp, or set OTEL_TRACES_EXPORTER")
        return None
    return OTLPSpanExporter()


class _Carrier:
    """Reads the trace context from attributes: googclient_* first (python-pubsub), then plain."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get("googclient_" + key) or carrier.get(key)
        return [value] if value else None

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


@contextlib.contextmanager
def task_span(message: Message, task: str, batch: bool = False) -> Iterator[None]:
    """``batch``: ``message`` is the first of several; no one message id describes the call."""
    context = {"subscription": message.subscription, "task": task}
    if not batch:
        context["message_id"] = message.message_id
    with structlog.contextvars.bound_contextvars(**context):
        if _tracer is None:
            yield
        else:
            with _span(message, task):
                yield


@contextlib.contextmanager
def _span(message: Message, task: str) -> Iterator[None]:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(carrier=message.attributes, getter=_Carrier())  # type: ignore[arg-type]
    subscription = message.subscription.rsplit("/", 1)[-1]
    attributes = {
        "messaging.system": "gcp_pubsub",
        "messaging.operation": "process",
        "messaging.destination.name": subscription,
        "messaging.message.id": message.message_id,
        "messaging.gcp_pubsub.message.ordering_key": message.ordering_key,
        "messaging.gcp_pubsub.message.delivery_attempt": message.delivery_attempt or 0,
        "consumerd.task": task,
    }
    with _tracer.start_as_current_span(
        f"{subscription} process", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ) as span:
        ids = span.get_span_context()
        with structlog.contextvars.bound_contextvars(trace_id=format(ids.trace_id, "032x"), span_id=format(ids.span_id, "016x")):
            yield


def flush() -> None:
    """Before a worker exits (os._exit skips atexit): send the spans it still holds."""
    if _provider is not None:
        _provider.force_flush(5000)
