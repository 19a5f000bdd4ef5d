"""A task and its unit tests: consumerd.testing runs it as a worker does, in this process, no Pub/Sub."""

from consumerd import Message, Reject, Retry, task
from consumerd.testing import make_message, run_task


@task("refund", max_attempts=3)
def refund(msg: Message) -> None:
    order = msg.json()  # a payload that is not JSON is a reject (PayloadError)
    if order["amount"] <= 0:
        raise Reject("nothing to refund")
    if msg.attributes.get("bank") == "closed":
        raise Retry(after=300)  # come back in 5 minutes (at most 600 s)
    if msg.attributes.get("bank") == "down":
        raise ConnectionError("the bank did not answer")


def test_a_refund_is_acked():
    assert run_task("refund", {"order": 7, "amount": 500}).acked


def test_nothing_to_refund_is_dead_lettered():
    assert run_task(refund, {"order": 7, "amount": 0}).rejected == "Reject: nothing to refund"


def test_garbage_is_dead_lettered_too():
    assert run_task("refund", b"\x00 not json").rejected.startswith("PayloadError:")


def test_a_closed_bank_retries_in_5_minutes():
    msg = make_message({"order": 7, "amount": 500}, attributes={"bank": "closed"})
    assert run_task("refund", msg).retry_after == 300


def test_an_error_is_retried_until_the_last_attempt():
    down = {"bank": "down"}
    assert run_task("refund", {"order": 7, "amount": 500}, attributes=down).failed == "ConnectionError: the bank did not answer"
    last = run_task("refund", {"order": 7, "amount": 500}, attributes=down, delivery_attempt=3)
    assert last.rejected == "ConnectionError: the bank did not answer"
