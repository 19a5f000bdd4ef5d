"""A pipeline stage and its test: each order in, an enriched order out on the next topic."""

import json

from pydantic import BaseModel

from consumerd import publish, task
from consumerd.testing import run_task

TIERS = {"c-1": "gold"}  # stands in for the customer database


class Order(BaseModel):
    order_id: str
    customer: str
    amount: int  # cents


class EnrichedOrder(Order):
    tier: str


@task("enrich")
def enrich(order: Order) -> None:
    enriched = EnrichedOrder(**order.model_dump(), tier=TIERS.get(order.customer, "standard"))
    publish("orders-enriched", enriched, ordering_key=order.customer, stage="enriched")
    if order.amount >= 100_000:
        publish("orders-review", {"order_id": order.order_id, "amount": order.amount})  # a dict goes as JSON


def test_an_order_goes_to_the_next_stage_enriched():
    outcome = run_task("enrich", Order(order_id="A-1", customer="c-1", amount=1200), publish_topics=["orders-enriched"])
    [out] = outcome.published
    assert (out.topic, out.ordering_key, out.attributes["stage"]) == ("orders-enriched", "c-1", "enriched")
    assert EnrichedOrder.model_validate_json(out.data).tier == "gold"


def test_a_big_order_is_also_sent_for_review():
    big = Order(order_id="A-2", customer="c-9", amount=250_000)
    outcome = run_task("enrich", big, publish_topics=["orders-enriched", "orders-review"])
    assert [out.topic for out in outcome.published] == ["orders-enriched", "orders-review"]
    assert json.loads(outcome.published[1].data) == {"order_id": "A-2", "amount": 250_000}
    # Without orders-review in the allow-list the task fails, and nothing is published.
    failed = run_task("enrich", big, publish_topics=["orders-enriched"])
    assert failed.failed.startswith("PublishError:") and failed.published == []
