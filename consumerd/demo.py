"""Demo tasks that `make run` uses: publish with attribute task=NAME to run one."""

from __future__ import annotations

import asyncio
import hashlib
import time

from consumerd import Message, task
from consumerd.logsetup import get_logger

log = get_logger("consumerd.demo")


@task("echo")
def echo(msg: Message) -> None:
    """Logs what arrived (sizes and attributes, never the payload)."""
    log.info("demo.echo", message_id=msg.message_id, size=msg.size, attributes=dict(msg.attributes))


@task("sleep")
def sleep(msg: Message) -> None:
    """Sleeps for the JSON payload's "seconds" (default 1): an I/O-bound task."""
    time.sleep(float(msg.json().get("seconds", 1)) if msg.data else 1.0)


@task("hash")
def hash_(msg: Message) -> None:
    """Burns CPU for the JSON payload's "ms" milliseconds (default 20): a CPU-bound task."""
    budget = float(msg.json().get("ms", 20)) / 1000 if msg.data else 0.02
    digest = b""
    end = time.perf_counter() + budget
    while time.perf_counter() < end:
        digest = hashlib.sha256(digest).digest()


@task("resize", concurrency=2, timeout=10, max_backoff=30)
def resize(msg: Message) -> None:
    """Per-task options: at most 2 run at once on this host (other tasks still run), 10 s timeout."""
    time.sleep(float(msg.json().get("seconds", 1)) if msg.data else 1.0)


@task("fetch")
async def fetch(msg: Message) -> None:
    """An async task: waits the JSON payload's "seconds" (default 0.5) without holding a process;
    one worker runs up to `workers.async_concurrency` of these at once."""
    await asyncio.sleep(float(msg.json().get("seconds", 0.5)) if msg.data else 0.5)
    log.info("demo.fetched", message_id=msg.message_id)


@task("rows", batch_size=5, batch_wait=1.0)
def rows(msgs: list[Message]) -> None:
    """A batch task: up to 5 messages per call (waiting at most 1 s to fill), like one INSERT."""
    log.info("demo.rows", count=len(msgs), message_ids=[m.message_id for m in msgs])


@task("fail")
def fail(msg: Message) -> None:
    """Always raises: shows a failure, the nack and the redelivery."""
    raise RuntimeError("the demo task 'fail' always fails")


@task("noop")
def noop(msg: Message) -> None:
    """Does nothing: measures the daemon's own overhead per message."""
