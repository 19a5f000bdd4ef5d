"""One small task: count the words of a message and log the count."""

from __future__ import annotations

import structlog

from consumerd import Message, task

log = structlog.get_logger("example_tasks")


@task("word_count", timeout=30)
def word_count(msg: Message) -> None:
    """Returning acks the message; raising would retry it later."""
    words = len(msg.text().split())
    log.info("example.counted", message_id=msg.message_id, words=words)
