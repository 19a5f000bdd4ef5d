"""Typed tasks and task hooks for the integration tests; hooks note each call in hooks.txt.

With RAISING_HOOKS set, every task hook notes its call and then raises: the daemon must not care.
With SENTRY_DSN set, the documented Sentry recipe (examples/sentry_hooks.py) is loaded too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pydantic import BaseModel, Field

from consumerd import Message, TaskFailure, TaskSuccess, on_task_failure, on_task_success, task
from tests.support.tasks import _first_run, record


class Order(BaseModel):
    order_id: str
    amount: int = Field(ge=0)


@task("typed_order")
def typed_order(order: Order, msg: Message) -> None:
    record(f"order={order.order_id}", msg)
    record("done", msg)


@task("typed_rows", batch_size=5, batch_wait=0.5)
def typed_rows(orders: list[Order], msgs: list[Message]) -> None:
    for order, msg in zip(orders, msgs, strict=True):
        record(f"batch={len(msgs)}", msg)
        record(f"order={order.order_id}", msg)
        record("done", msg)


@task("typed_raise_once", min_backoff=0, max_backoff=1)
async def typed_raise_once(order: Order, msg: Message) -> None:
    if _first_run(msg):
        raise ValueError(f"order {order.order_id} failed on purpose, first run only")
    record("done", msg)


def _note(line: str) -> None:
    with open(Path(os.environ["TEST_LEDGER_DIR"]) / "hooks.txt", "a") as handle:
        handle.write(f"{line}\n")


@on_task_failure
def noted_failure(failure: TaskFailure) -> None:
    _note(f"failure {failure.message.message_id} {failure.attempt} {failure.fate} {type(failure.exception).__name__}")
    if os.environ.get("RAISING_HOOKS"):
        raise RuntimeError("the failure hook fails on purpose")


@on_task_success
def noted_success(success: TaskSuccess) -> None:
    _note(f"success {success.message.message_id} {success.attempt}")
    if os.environ.get("RAISING_HOOKS"):
        raise RuntimeError("the success hook fails on purpose")


if os.environ.get("SENTRY_DSN"):
    _spec = importlib.util.spec_from_file_location("sentry_hooks_example", Path(__file__).parents[2] / "examples" / "sentry_hooks.py")
    assert _spec is not None and _spec.loader is not None
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
