"""The one structlog configuration, shared by the supervisor and its workers.

Native journal entries when stdout is the journal; readable console output on a terminal; Cloud
Logging's structured JSON on Cloud Run and Kubernetes (`gcp`); plain JSON lines otherwise. The
stdlib loggers of google-cloud and grpc go through the same pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TextIO

import structlog

from consumerd.adapters.journal import JournalHandler, JournalLogger, JournalSender, stdout_is_journal

LogFormat = Literal["auto", "json", "console", "gcp"]


class Output(enum.Enum):
    """What `auto` (or an explicit format) resolves to in this process."""

    JOURNAL = "journal"
    CONSOLE = "console"
    JSON = "json"
    GCP = "gcp"


# Set by Cloud Run (services: K_SERVICE; worker pools: CLOUD_RUN_WORKER_POOL) and by Kubernetes in
# every container: their log agents read stdout and understand Cloud Logging's structured lines.
CLOUD_ENVIRONMENT = ("CLOUD_RUN_WORKER_POOL", "K_SERVICE", "KUBERNETES_SERVICE_HOST")


def resolve_output(fmt: LogFormat, stream: TextIO, environ: Mapping[str, str] | None = None) -> Output:
    environ = os.environ if environ is None else environ
    if fmt == "auto":
        if stream is sys.stdout and stdout_is_journal(environ):
            return Output.JOURNAL
        if _is_tty(stream):
            return Output.CONSOLE
        return Output.GCP if any(environ.get(name) for name in CLOUD_ENVIRONMENT) else Output.JSON
    return {"json": Output.JSON, "console": Output.CONSOLE, "gcp": Output.GCP}[fmt]


def configure_logging(
    fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None, google_level: str = "info", project: str = ""
) -> None:
    """``google_level``: the least the google, grpc and urllib3 loggers log at, whatever ``level`` is
    (their debug output includes request payloads, dead-letter copies among them). ``project``: the
    Google Cloud project traces belong to, for the `gcp` format's trace field."""
    global _google_floor
    _google_floor = logging.getLevelName(google_level.upper())
    stream = stream or sys.stdout
    output = resolve_output(fmt, stream)
    flush_logs()  # what the old output held back
    _pending.stream = stream
    if output is Output.JOURNAL:
        _configure_journal(level)
        return
    use_console = output is Output.CONSOLE
    renderer: list[structlog.types.Processor]
    if use_console:
        renderer = [structlog.dev.ConsoleRenderer(colors=_is_tty(stream))]
    elif output is Output.GCP:
        renderer = [structlog.processors.format_exc_info, CloudLoggingEntry(project), structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    shared: list[structlog.types.Processor] = [
        _add_pid,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=_LineFlushingStream(stream)),  # type: ignore[arg-type]  # a duck-typed TextIO
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(shared, renderer, numeric_level, stream)


# Cloud Logging's structured-logging fields: https://cloud.google.com/logging/docs/structured-logging
TRACE = "logging.googleapis.com/trace"
SPAN_ID = "logging.googleapis.com/spanId"
LABELS = "logging.googleapis.com/labels"
SOURCE_LOCATION = "logging.googleapis.com/sourceLocation"
SEVERITY = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR", "critical": "CRITICAL"}
LABEL_FIELDS = ("subscription", "task", "message_id")  # bound by the worker around each task, or given to an event
_SUMMARY_FIELDS = ("error", "detail")  # the first present follows the event name in `message`
_SUMMARY_MAX = 200  # characters of that text in `message`; the field itself stays whole
_RESERVED = ("severity", "message", "time", TRACE, SPAN_ID, LABELS, SOURCE_LOCATION)


class CloudLoggingEntry:
    """An event dict as one Cloud Logging structured entry: severity, message, time, trace, labels.

    `message` is what the Logs Explorer shows on the entry's line: the event name, then the event's
    `error` (or `detail`) text when it has one; `event` stays a field of its own, so queries on
    `jsonPayload.event` work as with the json format. Errors carry their source location, found the
    way `CallsiteParameterAdder` finds it (the log call's frame; a stdlib record's own fields).
    """

    def __init__(self, project: str) -> None:
        self.project = project
        self._callsite = structlog.processors.CallsiteParameterAdder(
            {
                structlog.processors.CallsiteParameter.PATHNAME,
                structlog.processors.CallsiteParameter.LINENO,
                structlog.processors.CallsiteParameter.FUNC_NAME,
            },
            additional_ignores=[__name__],
        )

    def __call__(self, logger: Any, name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        severity = SEVERITY.get(str(event.pop("level", name)), "DEFAULT")
        entry: dict[str, Any] = {"severity": severity, "message": _summary(event), "time": event.pop("timestamp", None)}
        trace_id, span_id = event.pop("trace_id", None), event.pop("span_id", None)
        if trace_id and self.project:
            entry[TRACE] = f"projects/{self.project}/traces/{trace_id}"
            if span_id:
                entry[SPAN_ID] = span_id
        elif trace_id:  # no project to name the trace with: the bare ids still link by hand
            event.update(trace_id=trace_id, span_id=span_id)
        labels = {key: str(event.pop(key)) for key in LABEL_FIELDS if isinstance(event.get(key), str | int)}
        if labels:
            entry[LABELS] = labels
        if severity in ("ERROR", "CRITICAL"):
            site = self._callsite(logger, name, {k: event[k] for k in ("_record", "_from_structlog") if k in event})
            entry[SOURCE_LOCATION] = {"file": site.get("pathname"), "line": site.get("lineno"), "function": site.get("func_name")}
        for key, value in event.items():
            entry[f"{key}_" if key in _RESERVED else key] = value  # a task's own `message=` must not hide ours
        return entry


def _summary(event: Mapping[str, Any]) -> str:
    name = str(event.get("event", ""))
    for key in _SUMMARY_FIELDS:
        text = event.get(key)
        if text not in (None, ""):
            return f"{name}: {str(text)[:_SUMMARY_MAX]}"
    return name


def _configure_journal(level: str) -> None:
    """Under systemd with stdout on the journal: native entries with fields, not text lines."""
    sender = JournalSender()
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            _add_pid,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
        ],  # the last processor returns the event dict: JournalLogger.msg(**event) sends it
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *args: JournalLogger(sender),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [JournalHandler(sender)]
    _set_levels(root, numeric_level)


_google_floor = logging.INFO


def _set_levels(root: logging.Logger, level: int) -> None:
    root.setLevel(level)
    for noisy in ("google", "grpc", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, _google_floor))


def _route_stdlib_logging(
    shared: list[structlog.types.Processor],
    renderer: list[structlog.types.Processor],
    level: int,
    stream: TextIO,
) -> None:
    handler = logging.StreamHandler(_LineFlushingStream(stream))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            # The record's own fields are dropped only now: the gcp entry reads its source location from them.
            processors=[*renderer[:-1], structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer[-1]],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _set_levels(root, level)


def _add_pid(_logger: object, _name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    # Read at each event, not bound once: workers are forked from the fork server.
    event.setdefault("pid", os.getpid())
    return event


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


class _LineFlushingStream:
    """Writes whole lines and flushes each, so journald and pipes see events at once; except on the
    thread within `batched_log_lines` (the supervisor's loop), whose lines wait for `flush_logs`:
    it calls that once per pass before it waits, so a pass that settles many messages makes one
    write, not one per line (a line's write and the wakeup of its reader cost more than rendering
    it). Lines of other threads flush at once, after those pending, so the order holds. The
    pending lines are bounded (MAX_PENDING characters, then they are written).

    A closed or broken stdout (a task closed it, the journal went away) must not kill the process
    that logs: such writes are dropped.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        with _lock:
            if _batching == threading.get_ident() and _pending.size + len(text) <= MAX_PENDING:
                _pending.lines.append(text)
                _pending.size += len(text)
                return len(text)
            return _write(self._stream, text)

    def flush(self) -> None:
        if _batching != threading.get_ident():
            with _lock:
                _write(self._stream, "")


@dataclasses.dataclass
class _Pending:
    stream: TextIO | None = None  # where the pending lines go: the configured output
    lines: list[str] = dataclasses.field(default_factory=list)
    size: int = 0


MAX_PENDING = 256 * 1024
_lock = threading.Lock()
_pending = _Pending()
_batching: int | None = None  # the thread whose lines wait for `flush_logs`


def _write(stream: TextIO, text: str) -> int:
    """The pending lines, then ``text`` to ``stream``, written and flushed (under ``_lock``)."""
    if _pending.lines and _pending.stream is not None:
        held = "".join(_pending.lines)
        _pending.lines.clear()
        _pending.size = 0
        if _pending.stream is stream:
            text = held + text
        else:  # the output was configured anew since
            _write(_pending.stream, held)
    try:
        written = stream.write(text) if text else 0
        stream.flush()
        return written
    except (OSError, ValueError):
        return 0


def _new_lock_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_new_lock_in_child)


@contextlib.contextmanager
def batched_log_lines() -> Iterator[None]:
    """Within it, this thread's log lines are written when it calls `flush_logs` (and at its end)."""
    global _batching
    _batching = threading.get_ident()
    try:
        yield
    finally:
        _batching = None
        flush_logs()


def flush_logs() -> None:
    """Write the lines held back (see `batched_log_lines`)."""
    if _pending.lines and _pending.stream is not None:
        with _lock:
            _write(_pending.stream, "")


def get_logger(name: str = "consumerd") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
