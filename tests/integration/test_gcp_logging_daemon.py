"""`logging.format = "gcp"` on the real daemon: every stdout line of the supervisor and its workers is
one Cloud Logging structured entry, and a traced task's lines name its trace and span."""

from __future__ import annotations

import json
import re
import time

import pytest

from harness.daemon import PROJECT
from harness.procinfo import process_table

pytestmark = pytest.mark.integration
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
SEVERITIES = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
TRACE, SPAN_ID = "logging.googleapis.com/trace", "logging.googleapis.com/spanId"
LABELS, SOURCE = "logging.googleapis.com/labels", "logging.googleapis.com/sourceLocation"


def test_every_line_of_every_process_is_a_cloud_logging_entry(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    [traced] = broker.publish(topic, data=b"{}", task="trace_probe", traceparent=f"00-{TRACE_ID}-00f067aa0ba902b7-01")
    [levels] = broker.publish(topic, task="log_levels")
    [flaky] = broker.publish(topic, task="raise_once")
    ok = broker.publish(topic, 3, task="ok")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    ledger.path.touch()  # before the fork server hides `credentials`: a file made later beside it is unreadable to tasks
    daemon = make_daemon(
        sub,
        logging={"format": "gcp", "level": "debug"},
        tracing={"enabled": True},
        retry={"min_backoff": 0, "max_backoff": 0},
        tasks={"modules": ["tests.support.tasks", "tests.integration.gcp_log_tasks"]},
        # A credentials directory to hide makes the fork server log a line of its own, before any task runs.
        env={"OTEL_TRACES_EXPORTER": "none", "CREDENTIALS_DIRECTORY": str(credentials)},
    )
    expected = {traced, levels, flaky, *ok}
    deadline = time.monotonic() + 60
    while not expected <= set(ledger.ids("done")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert expected <= set(ledger.ids("done"))
    daemon.wait_for("message.done", count=len(expected))
    workers = set(daemon.workers())
    [fork_server] = {parent for parent, _ in process_table().values() if parent != daemon.pid} & {
        pid for pid, (parent, _) in process_table().items() if parent == daemon.pid
    }
    assert daemon.stop() is not None

    entries = [json.loads(line) for line in daemon.raw]  # every line: one that is not JSON fails here
    assert len(entries) == len(daemon.raw) > 20
    for entry in entries:
        assert entry["severity"] in SEVERITIES and RFC3339_UTC.match(entry["time"]), entry
        assert isinstance(entry["message"], str) and entry["message"].startswith(entry["event"]), entry
        assert "level" not in entry and "timestamp" not in entry and "trace_id" not in entry, entry
        assert (SOURCE in entry) is (entry["severity"] in ("ERROR", "CRITICAL")), entry
        assert all(isinstance(v, str) for v in entry.get(LABELS, {}).values()), entry
    pids = {e["pid"] for e in entries}
    assert daemon.pid in pids and fork_server in pids and pids & workers, "the supervisor's, the fork server's, the workers' lines"
    assert {e["pid"] for e in entries if e["event"].startswith("task.")} <= workers
    assert next(e for e in entries if e["pid"] == fork_server)["event"].startswith("workers.credentials_")

    def one(event: str, **labels: str) -> dict:
        [found] = [e for e in entries if e["event"] == event and labels.items() <= e.get(LABELS, {}).items()]
        return found

    from tests.integration.gcp_log_tasks import LEVELS  # here, not at collection: it registers a task

    said = {level: one(f"task.said_{level}", message_id=levels, task="log_levels") for level in LEVELS}
    assert {level: e["severity"] for level, e in said.items()} == {level: level.upper() for level in LEVELS}
    assert said["error"][SOURCE]["file"].endswith("tests/integration/gcp_log_tasks.py")
    assert said["error"][SOURCE]["function"] == "log_levels" and isinstance(said["error"][SOURCE]["line"], int)
    assert said["info"][LABELS] == {"subscription": sub, "task": "log_levels", "message_id": levels}
    stdlib = one("a stdlib error from the task")
    assert stdlib["severity"] == "ERROR" and stdlib["logger"] == "google.cloud.example"
    assert stdlib[SOURCE]["function"] == "log_levels" and stdlib[LABELS]["message_id"] == levels

    span = one("task.traced_event", message_id=traced)
    assert span[TRACE] == f"projects/{PROJECT}/traces/{TRACE_ID}"
    assert re.fullmatch(r"[0-9a-f]{16}", span[SPAN_ID]) and span[SPAN_ID] != "00f067aa0ba902b7"  # the task's span
    assert said["info"][TRACE].startswith(f"projects/{PROJECT}/traces/")  # tracing is on: a trace of its own
    assert TRACE not in one("message.done", message_id=traced)  # the supervisor has no span

    raised = one("task.raised", message_id=flaky)
    assert raised["severity"] == "WARNING" and raised["message"] == "task.raised"
    assert "Traceback (most recent call last):" in raised["exception"]
    assert one("daemon.ready")[LABELS] == {"subscription": sub}
