"""The one structlog configuration, shared by the supervisor and its workers.

JSON lines on stdout when it is not a terminal (what journald captures), readable console output on
a terminal. The stdlib loggers of google-cloud and grpc go through the same pipeline.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO

import structlog

from consumerd.adapters.journal import JournalHandler, JournalLogger, JournalSender, stdout_is_journal

LogFormat = Literal["auto", "json", "console"]


def configure_logging(fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None, google_level: str = "info") -> None:
    """``google_level``: the least the google, grpc and urllib3 loggers log at, whatever ``level`` is
    (their debug output includes request payloads, dead-letter copies among them)."""
    global _google_floor
    _google_floor = logging.getLevelName(google_level.upper())
    stream = stream or sys.stdout
    if fmt == "auto" and stream is sys.stdout and stdout_is_journal():
        _configure_journal(level)
        return
    use_console = fmt == "console" or (fmt == "auto" and _is_tty(stream))
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=use_console and _is_tty(stream)) if use_console else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.types.Processor] = [
        _add_pid,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if not use_console else _identity,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=_LineFlushingStream(stream)),  # type: ignore[arg-type]  # a duck-typed TextIO
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(shared, renderer, numeric_level, stream)


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
    renderer: structlog.types.Processor,
    level: int,
    stream: TextIO,
) -> None:
    handler = logging.StreamHandler(_LineFlushingStream(stream))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _set_levels(root, level)


def _add_pid(_logger: object, _name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    # Read at each event, not bound once: workers are forked from the fork server.
    event.setdefault("pid", os.getpid())
    return event


def _identity(_logger: object, _name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    return event


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


class _LineFlushingStream:
    """Writes whole lines and flushes each, so journald and pipes see events at once.

    A closed or broken stdout (a task closed it, the journal went away) must not kill the process
    that logs: such writes are dropped.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            written = self._stream.write(text)
            self._stream.flush()
            return written
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass


def get_logger(name: str = "consumerd") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
