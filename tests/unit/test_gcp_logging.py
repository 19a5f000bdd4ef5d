"""`logging.format = "gcp"`: each line one Cloud Logging structured entry, checked field by field."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from consumerd.logsetup import LABELS, SOURCE_LOCATION, SPAN_ID, TRACE, Output, configure_logging, get_logger, resolve_output
from consumerd.message import Message
from consumerd.worker import tracing

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
SUBSCRIPTION = "projects/p/subscriptions/orders"


@pytest.fixture
def gcp() -> Iterator[Callable[[str], io.StringIO]]:
    """Configure the gcp format writing to a buffer; the previous configuration comes back after."""
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def configure(project: str) -> io.StringIO:
        stream = io.StringIO()
        configure_logging("gcp", "debug", stream=stream, project=project)
        return stream

    yield configure
    structlog.configure(**saved)
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def lines(gcp: Callable[[str], io.StringIO]) -> io.StringIO:
    return gcp("my-project")


def entries(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def message(mid: str = "m1") -> Message:
    return Message(mid, b"", {}, None, None, "", SUBSCRIPTION)


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "critical"])
def test_each_level_is_its_severity_with_message_time_and_the_event(lines, level):
    getattr(get_logger("consumerd"), level)("thing.happened", count=3)
    [entry] = entries(lines)
    assert entry["severity"] == level.upper()
    assert entry["message"] == "thing.happened" and entry["event"] == "thing.happened"
    assert RFC3339_UTC.match(entry["time"]), entry["time"]
    assert entry["count"] == 3 and entry["pid"] == os.getpid()
    assert "level" not in entry and "timestamp" not in entry
    assert list(entry)[:3] == ["severity", "message", "time"]


def test_an_error_text_follows_the_event_in_the_message_and_stays_a_field(lines):
    log = get_logger()
    log.warning("pubsub.pull_failed", error="DeadlineExceeded: 504")
    log.info("daemon.dumpable", detail="x" * 500)
    pulled, dumpable = entries(lines)
    assert pulled["message"] == "pubsub.pull_failed: DeadlineExceeded: 504" and pulled["error"] == "DeadlineExceeded: 504"
    assert dumpable["message"] == "daemon.dumpable: " + "x" * 200 and len(dumpable["detail"]) == 500


def test_errors_carry_their_source_location_and_others_do_not(lines):
    log = get_logger()
    log.warning("a.warning")
    line = sys._getframe().f_lineno + 1
    log.error("an.error")
    warning, error = entries(lines)
    assert SOURCE_LOCATION not in warning
    assert error[SOURCE_LOCATION] == {
        "file": __file__,
        "line": line,
        "function": "test_errors_carry_their_source_location_and_others_do_not",
    }


def test_an_exception_is_a_traceback_field_error_reporting_reads(lines):
    try:
        raise ValueError("bad payload")
    except ValueError:
        get_logger().exception("task.failed")
    [entry] = entries(lines)
    assert entry["severity"] == "ERROR" and entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].endswith("ValueError: bad payload")


def test_the_task_context_becomes_labels(lines):
    log = get_logger("task")
    with tracing.task_span(message("m7"), "resize"):
        log.info("task.progress")
    with tracing.task_span(message("m8"), "rows", batch=True):
        log.info("task.batch_progress")
    log.info("message.done", message_id="m9", task="resize", attempt=2)
    single, batch, supervisor = entries(lines)
    assert single[LABELS] == {"subscription": SUBSCRIPTION, "task": "resize", "message_id": "m7"}
    assert batch[LABELS] == {"subscription": SUBSCRIPTION, "task": "rows"}  # no one message id describes a batch
    assert supervisor[LABELS] == {"task": "resize", "message_id": "m9"} and supervisor["attempt"] == 2
    assert not {"subscription", "task", "message_id"} & (set(single) | set(batch) | set(supervisor))
    assert TRACE not in single  # tracing is off


def test_with_tracing_on_a_line_names_the_task_span_and_its_trace(lines, monkeypatch):
    monkeypatch.setattr(tracing, "_tracer", TracerProvider().get_tracer("test"))
    traced = Message("m1", b"", {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, None, None, "", SUBSCRIPTION)
    with tracing.task_span(traced, "resize"):
        span = trace.get_current_span().get_span_context()
        get_logger("task").info("task.traced")
    get_logger().info("message.done")
    inside, after = entries(lines)
    assert inside[TRACE] == "projects/my-project/traces/4bf92f3577b34da6a3ce929d0e0e4736"
    assert inside[SPAN_ID] == format(span.span_id, "016x") and len(inside[SPAN_ID]) == 16
    assert span.span_id != 0x00F067AA0BA902B7  # the task's own span, the publisher's is its parent
    assert "trace_id" not in inside and "span_id" not in inside
    assert TRACE not in after and SPAN_ID not in after


def test_without_a_project_the_bare_trace_id_stays(gcp):
    stream = gcp("")
    with structlog.contextvars.bound_contextvars(trace_id="ab" * 16, span_id="cd" * 8):
        get_logger().info("x")
    [entry] = entries(stream)
    assert TRACE not in entry and SPAN_ID not in entry and (entry["trace_id"], entry["span_id"]) == ("ab" * 16, "cd" * 8)


def test_a_field_named_like_an_entry_field_does_not_replace_it(lines):
    get_logger("task").info("task.note", message="from the task", severity="loud", time=3)
    [entry] = entries(lines)
    assert entry["message"] == "task.note" and entry["severity"] == "INFO" and RFC3339_UTC.match(entry["time"])
    assert entry["message_"] == "from the task" and entry["severity_"] == "loud" and entry["time_"] == 3


def test_stdlib_loggers_go_through_the_same_renderer(lines):
    google = logging.getLogger("google.api_core.retry")
    google.warning("retrying %s", "pull")
    line = sys._getframe().f_lineno + 1
    google.error("gave up")
    try:
        raise OSError("socket closed")
    except OSError:
        logging.getLogger("grpc._channel").exception("channel broke")
    warning, error, failed = entries(lines)
    assert warning["severity"] == "WARNING" and warning["message"] == "retrying pull" and warning["logger"] == "google.api_core.retry"
    assert RFC3339_UTC.match(warning["time"]) and SOURCE_LOCATION not in warning
    assert error["severity"] == "ERROR" and error[SOURCE_LOCATION]["line"] == line and error[SOURCE_LOCATION]["file"] == __file__
    assert failed["exception"].endswith("OSError: socket closed") and "_record" not in failed


@pytest.mark.parametrize(
    ("environ", "tty", "expected"),
    [
        ({"K_SERVICE": "orders"}, False, Output.GCP),  # Cloud Run service
        ({"CLOUD_RUN_WORKER_POOL": "orders"}, False, Output.GCP),  # Cloud Run worker pool
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, False, Output.GCP),  # GKE
        ({"K_SERVICE": "orders"}, True, Output.CONSOLE),  # a terminal wins: someone is reading it
        ({}, False, Output.JSON),
        ({}, True, Output.CONSOLE),
    ],
)
def test_auto_picks_gcp_on_cloud_run_and_kubernetes_unless_on_a_terminal(environ, tty, expected):
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert resolve_output("auto", Stream(), environ) is expected
    assert resolve_output("gcp", Stream(), {}) is Output.GCP and resolve_output("json", Stream(), environ) is Output.JSON


def test_the_journal_comes_first_where_stdout_is_the_journal():
    st = os.fstat(1)
    environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "K_SERVICE": "orders"}
    assert resolve_output("auto", sys.stdout, environ) is Output.JOURNAL
