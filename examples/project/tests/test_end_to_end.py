"""End-to-end: the real daemon on shop.tasks against the Pub/Sub emulator (consumerd's pytest plugin)."""

from __future__ import annotations

import json


def test_orders_through_the_daemon(consumerd_daemon, dead_letters):
    daemon = consumerd_daemon(workers={"concurrency": 2})
    ok = daemon.publish({"id": 1, "amount": 500}, task="charge")
    negative = daemon.publish({"id": 2, "amount": -1}, task="charge")
    later = daemon.publish({"id": 3, "amount": 100}, task="charge", gateway="down")
    rows = [daemon.publish("SKU-1,3", task="stock"), daemon.publish("oops", task="stock")]

    assert daemon.wait_for(ok).acked
    assert daemon.wait_for(negative).rejected == "Reject: the amount must be positive"
    assert daemon.wait_for(later).retry_after == 60
    assert daemon.wait_for(rows[0]).acked
    assert daemon.wait_for(rows[1]).rejected == "Reject: a stock row is SKU,QUANTITY"

    copy = dead_letters.wait_for(negative)
    assert json.loads(copy.data) == {"id": 2, "amount": -1}
    assert copy.attributes["consumerd_task"] == "charge"

    status = daemon.status()
    assert status["counters"]["succeeded"] >= 2 and status["counters"]["dead_lettered"] >= 2


def test_an_async_task_through_the_daemon(consumerd_daemon):
    daemon = consumerd_daemon()
    sent = daemon.publish(b"", task="notify", email="a@example.org")
    unaddressed = daemon.publish(b"", task="notify")
    assert daemon.wait_for(sent).acked
    assert daemon.wait_for(unaddressed).failed == "ValueError: no email address to notify"
