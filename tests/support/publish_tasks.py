"""Tasks that publish their results (`consumerd.publish`), for the pipeline tests.

The output topic comes in the message's `to` attribute (each test makes its own topic); every task
records to the ledger of `tests.support.tasks`.
"""

from __future__ import annotations

import time

from consumerd import Message, publish, task
from tests.support.tasks import record


@task("enrich")
def enrich(msg: Message) -> None:
    """Two outputs per input, with the input's id in the data and an ordering key."""
    record("start", msg)
    for part in (1, 2):
        publish(msg.attributes["to"], {"source": msg.message_id, "part": part}, ordering_key=msg.message_id, stage="enriched")
    time.sleep(float(msg.attributes.get("seconds", "0")))
    record("done", msg)


@task("publish_then_fail")
def publish_then_fail(msg: Message) -> None:
    record("start", msg)
    publish(msg.attributes["to"], b"must never be published")
    raise ValueError("failed after publishing: its outputs are discarded")


@task("publish_100mb")
def publish_100mb(msg: Message) -> None:
    """Tries to publish 100 MB in 4 MB outputs; [publish] max_bytes (10 MiB) ends it at the third."""
    record("start", msg)
    chunk = b"x" * 4_000_000
    for _ in range(25):
        publish(msg.attributes["to"], chunk)
    record("done", msg)
