"""Unit tests: each task run by consumerd.testing.run_task, as a worker runs it, in this process."""

from __future__ import annotations

import pytest
from shop.tasks import Gateway, Order, charge

from consumerd.testing import TaskOutcome, make_message, run_task


def one(outcome: TaskOutcome | list[TaskOutcome]) -> TaskOutcome:
    assert isinstance(outcome, TaskOutcome)
    return outcome


def test_a_valid_order_is_charged_and_acked():
    outcome = one(run_task("charge", Order(id=1, amount=500)))
    assert outcome.acked and 1 in Gateway.charged


def test_a_negative_amount_is_dead_lettered():
    assert one(run_task(charge, {"id": 2, "amount": -5})).rejected == "Reject: the amount must be positive"


def test_garbage_is_dead_lettered_as_a_payload_error():
    assert one(run_task("charge", b"\x00 not json")).rejected.startswith("PayloadError:")  # type: ignore[union-attr]


def test_an_unavailable_gateway_retries_in_a_minute(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Gateway, "available", False)
    assert one(run_task("charge", Order(id=3, amount=100))).retry_after == 60


def test_the_last_attempt_of_a_failing_order_is_dead_lettered(monkeypatch: pytest.MonkeyPatch):
    def broken(order: Order, idempotency_key: str) -> None:
        raise ConnectionError("reset by peer")

    monkeypatch.setattr(Gateway, "charge", broken)
    assert one(run_task("charge", Order(id=4, amount=100), delivery_attempt=1)).failed == "ConnectionError: reset by peer"
    assert one(run_task("charge", Order(id=4, amount=100), delivery_attempt=5)).rejected == "ConnectionError: reset by peer"


def test_only_the_bad_rows_of_a_batch_are_rejected():
    good, bad = make_message("SKU-1,4"), make_message("SKU-2,many")
    outcomes = run_task("stock", [good, bad])
    assert isinstance(outcomes, list)
    assert [o.acked for o in outcomes] == [True, False]
    assert outcomes[1].rejected == "Reject: a stock row is SKU,QUANTITY"


def test_an_async_task_and_its_timeout():
    assert one(run_task("notify", b"", attributes={"email": "a@example.org"})).acked
    assert one(run_task("notify", b"", attributes={})).failed == "ValueError: no email address to notify"
    slow = one(run_task("notify", b"", timeout=0.2, attributes={"email": "a@example.org", "latency": "10"}))
    assert slow.failed == "TaskTimeout: cancelled after 0.2s"


def test_isolated_runs_use_a_real_forked_worker():
    assert one(run_task("charge", Order(id=5, amount=100), isolated=True)).acked
    assert 5 not in Gateway.charged  # charged in the worker's memory, not in this process
