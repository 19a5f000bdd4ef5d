"""Tasks whose every run ends the same way: run by `run_task` and by the real daemon, compared."""

from __future__ import annotations

import asyncio
import time

from consumerd import BatchResult, Message, Reject, Retry, task


@task("parity_ok")
def ok(msg: Message) -> None:
    msg.json()


@task("parity_retry")
def retry(msg: Message) -> None:
    raise Retry(after=float(msg.attributes["after"]))


@task("parity_reject")
def reject(msg: Message) -> None:
    raise Reject("this order can never be charged")


@task("parity_parse")
def parse(msg: Message) -> None:
    msg.json()


@task("parity_boom")
def boom(msg: Message) -> None:
    raise ValueError("the gateway said no")


@task("parity_last_attempt", max_attempts=1)
def last_attempt(msg: Message) -> None:
    raise ValueError("out of attempts")


@task("parity_slow", timeout=1)
def slow(msg: Message) -> None:
    time.sleep(30)


@task("parity_rows", batch_size=3, batch_wait=0.5)
def rows(msgs: list[Message]) -> BatchResult:
    result = BatchResult()
    for msg in msgs:
        kind = msg.attributes.get("fail")
        if kind == "retry":
            result.retry(msg, after=45)
        elif kind == "reject":
            result.reject(msg, "row is malformed")
        elif kind == "error":
            result.fail(msg, KeyError("sku"))
    return result


@task("parity_aio_ok")
async def aio_ok(msg: Message) -> None:
    await asyncio.sleep(0.01)
    msg.json()


@task("parity_aio_boom")
async def aio_boom(msg: Message) -> None:
    await asyncio.sleep(0.01)
    raise RuntimeError("async upstream failed")


@task("parity_aio_hang", timeout=1)
async def aio_hang(msg: Message) -> None:
    await asyncio.sleep(30)


OUTPUTS = "projects/test-project/topics/parity-outputs"  # harness.daemon.PROJECT's


@task("parity_publish")
def publishes(msg: Message) -> None:
    from consumerd import publish

    publish(OUTPUTS, {"part": 1}, ordering_key="k", n="1")
    publish(OUTPUTS, b"part 2", n="2")
