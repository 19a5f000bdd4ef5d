"""Trace propagation: a message published by python-pubsub with OpenTelemetry on gets a task span in its trace."""

from __future__ import annotations

import json

import pytest
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def publisher_spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def test_a_traced_publish_continues_in_the_task_span(broker, topic_sub, make_daemon, ledger, tmp_path, publisher_spans):
    topic, sub = topic_sub()
    publisher = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_open_telemetry_tracing=True),
        transport=PublisherGrpcTransport(channel=broker.adapter._channel(PublisherGrpcTransport)),
    )
    mid = publisher.publish(topic, b"{}", task="trace_probe").result(timeout=30)
    publisher.stop()
    [create] = [s for s in publisher_spans.get_finished_spans() if s.name.endswith(" create")]
    publisher_trace = format(create.context.trace_id, "032x")
    daemon = make_daemon(sub, tracing={"enabled": True}, env={"OTEL_TRACES_EXPORTER": "none"})
    daemon.wait_for("message.done", message_id=mid)
    seen = json.loads((tmp_path / f"trace-{mid}.json").read_text())
    assert seen["trace_id"] == publisher_trace
    assert seen["name"] == f"{sub.rsplit('/', 1)[-1]} process" and seen["kind"] == "SpanKind.CONSUMER"
    attributes = seen["attributes"]
    assert attributes["messaging.system"] == "gcp_pubsub" and attributes["messaging.message.id"] == mid
    assert "messaging.gcp_pubsub.message.delivery_attempt" in attributes and "messaging.gcp_pubsub.message.ordering_key" in attributes
    [event] = daemon.wait_for("task.traced_event", message_id=mid)
    assert event["trace_id"] == publisher_trace  # the task's own log events carry the trace id


def test_a_plain_traceparent_attribute_is_honoured_too(broker, topic_sub, make_daemon, tmp_path):
    topic, sub = topic_sub()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    [mid] = broker.publish(topic, data=b"{}", task="trace_probe", traceparent=f"00-{trace_id}-00f067aa0ba902b7-01")
    daemon = make_daemon(sub, tracing={"enabled": True}, env={"OTEL_TRACES_EXPORTER": "none"})
    daemon.wait_for("message.done", message_id=mid)
    assert json.loads((tmp_path / f"trace-{mid}.json").read_text())["trace_id"] == trace_id
