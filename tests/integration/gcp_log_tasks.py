"""A task for the gcp log format test: one event at every level, through structlog and the stdlib."""

from __future__ import annotations

import logging

import structlog

from consumerd import Message, task
from tests.support.tasks import record

LEVELS = ("debug", "info", "warning", "error", "critical")


@task("log_levels")
def log_levels(msg: Message) -> None:
    log = structlog.get_logger("task")
    for level in LEVELS:
        getattr(log, level)(f"task.said_{level}")
    logging.getLogger("google.cloud.example").error("a stdlib error from %s", "the task")
    record("done", msg)
