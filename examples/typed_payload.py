"""A typed task: the payload is validated into `Order` before the task runs."""

from pydantic import BaseModel, Field

from consumerd import Message, task


class Item(BaseModel):
    sku: str
    quantity: int = Field(gt=0)


class Order(BaseModel):
    order_id: str
    items: list[Item]


@task("place_order")
def place_order(order: Order, msg: Message) -> str:
    # `order` is an Order here; a payload that is not one never reaches this line: it is
    # dead-lettered with the validation errors as its reason, and never retried.
    return f"order {order.order_id}: {sum(i.quantity for i in order.items)} items (message {msg.message_id})"
