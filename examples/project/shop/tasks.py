"""The shop's tasks: charge an order, import stock rows in batches, notify a customer."""

from __future__ import annotations

import asyncio

import pydantic

from consumerd import BatchResult, Message, Reject, Retry, task


class Order(pydantic.BaseModel):
    id: int
    amount: int  # cents
    currency: str = "EUR"


class Gateway:
    """Stands in for a payment provider; tests switch it off to see the task ask for a retry."""

    available = True
    charged: list[int] = []

    @classmethod
    def charge(cls, order: Order, idempotency_key: str) -> None:
        cls.charged.append(order.id)


@task("charge", timeout=30, max_attempts=5)
def charge(msg: Message) -> None:
    try:
        order = Order.model_validate(msg.json())  # a payload that is not JSON is a reject already
    except pydantic.ValidationError as exc:
        raise Reject(f"not an order: {exc.error_count()} invalid fields") from None
    if order.amount <= 0:
        raise Reject("the amount must be positive")
    if not Gateway.available or msg.attributes.get("gateway") == "down":
        raise Retry(after=60, reason="the payment gateway is unavailable")
    Gateway.charge(order, idempotency_key=msg.idempotency_key)


@task("stock", batch_size=100, batch_wait=0.5)
def stock(msgs: list[Message]) -> BatchResult:
    result = BatchResult()
    for msg in msgs:
        row = msg.text().split(",")
        if len(row) != 2 or not row[1].strip().isdigit():
            result.reject(msg, "a stock row is SKU,QUANTITY")
    return result


@task("notify", timeout=5)
async def notify(msg: Message) -> None:
    await asyncio.sleep(float(msg.attributes.get("latency", "0.01")))  # the mail service's answer
    if not msg.attributes.get("email"):
        raise ValueError("no email address to notify")
