"""Typed payloads: signature rules at @task, validation in the worker, rejects with the errors, batches."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import socket
import typing

import pytest
from pydantic import BaseModel, Field
from typing_extensions import TypedDict  # pydantic needs it on Python 3.11

from consumerd import BatchResult, Message
from consumerd.errors import RegistryError
from consumerd.ipc.framing import result_reader
from consumerd.ipc.records import MAX_ERROR_CHARS, BatchJob, Job, Outcome, Result, TaskOptions
from consumerd.policy.deadletter import MAX_VALUE_BYTES, cut_utf8
from consumerd.worker.child import run_batch, run_job
from consumerd.worker.coroutines import AsyncRunner
from consumerd.worker.registry import Registry
from tests.unit.fakes import Log


class Order(BaseModel):
    order_id: str
    amount: int = Field(ge=0)


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Row(TypedDict):
    id: int
    name: str


def msg(i: int, payload: object) -> Message:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Message(f"m{i}", data, {}, None, None, "", "s")


def registry_with(func, **options) -> Registry:
    registry = Registry()
    registry.register("t", func, TaskOptions(**options))
    return registry


def run(func, payload: object) -> Result:
    result = run_job(Job(1, "t", msg(1, payload)), registry_with(func), Log())
    assert Result.decode(result.encode()) == result
    return result


# -- what the task receives ------------------------------------------------------------------------


def test_a_model_parameter_gets_the_validated_payload_and_the_message_beside_it():
    seen = []

    def place(order: Order, msg: Message) -> None:
        seen.append((order, msg.message_id))

    assert run(place, {"order_id": "o1", "amount": 3}).outcome is Outcome.SUCCESS
    assert seen == [(Order(order_id="o1", amount=3), "m1")]


@pytest.mark.parametrize(
    ("annotation", "payload", "expected"),
    [
        (Point, {"x": 1, "y": 2.5}, Point(1.0, 2.5)),
        (Row, {"id": 7, "name": "a"}, {"id": 7, "name": "a"}),
        (list[Order], [{"order_id": "a", "amount": 1}], [Order(order_id="a", amount=1)]),
        (dict[str, int], {"a": 1}, {"a": 1}),
    ],
)
def test_anything_a_type_adapter_accepts(annotation, payload, expected):
    seen = []

    def handler(value) -> None:
        seen.append(value)

    handler.__annotations__ = {"value": annotation, "return": None}
    assert run(handler, payload).outcome is Outcome.SUCCESS and seen == [expected]


def test_the_message_may_come_first_and_keyword_only_parameters_work():
    seen = []

    def handler(m: Message, *, order: Order) -> None:
        seen.append((m.message_id, order.order_id))

    assert run(handler, {"order_id": "o2", "amount": 0}).outcome is Outcome.SUCCESS and seen == [("m1", "o2")]


@pytest.mark.parametrize("func", [lambda m: m.data, lambda *_: None])
def test_plain_tasks_still_get_the_message(func):
    assert run(func, b"not json at all").outcome is Outcome.SUCCESS


def test_an_annotated_message_task_is_untyped():
    def handler(msg: Message) -> None:
        assert isinstance(msg, Message)

    assert not registry_with(handler).get("t").signature.typed
    assert run(handler, b"\xff").outcome is Outcome.SUCCESS


# -- what does not validate ------------------------------------------------------------------------


def test_a_payload_that_does_not_validate_is_a_reject_naming_each_error_without_the_input():
    def place(order: Order) -> None:
        raise AssertionError("never runs")

    result = run(place, {"order_id": "secret-value", "amount": -5, "extra": 1})
    assert result.outcome is Outcome.REJECT and result.retry_after is None
    assert result.error.startswith("PayloadError: payload is not a valid Order: 1 validation error: amount: Input should be")
    assert "secret-value" not in result.error and "-5" not in result.error


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe", b""])
def test_a_payload_that_is_not_json_is_a_reject(data):
    def place(order: Order) -> None:
        raise AssertionError("never runs")

    result = run(place, data)
    assert result.outcome is Outcome.REJECT and "Invalid JSON" in result.error


def test_a_thousand_errors_fit_the_result_and_the_dead_letter_attribute():
    def rows(items: list[Order]) -> None:
        raise AssertionError("never runs")

    result = run(rows, [{"amount": "x" * 200}] * 1000)
    assert result.outcome is Outcome.REJECT and len(result.error) <= MAX_ERROR_CHARS
    assert "2000 validation errors" in result.error and "and 1980 more" in result.error
    assert len(cut_utf8(result.error).encode()) <= MAX_VALUE_BYTES and cut_utf8(result.error).startswith("PayloadError: payload is not")


# -- signature rules at registration ---------------------------------------------------------------


class Opaque:
    pass


class StdTypedDict(typing.TypedDict):
    a: int


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("def f(a: Order, b: Order): pass", "one parameter takes the payload, not 2"),
        ("def f(a: Order, b): pass", "parameter b is neither the payload nor the message"),
        ("def f(a: Order, m: Message, n: Message): pass", "neither the payload nor the message"),
        ("def f(a: Opaque): pass", "pydantic cannot validate a payload into Opaque"),
        ("def f(a: StdTypedDict): pass", "use `typing_extensions.TypedDict`"),
        ("def f(): pass", "a task takes the message as its one parameter"),
        ("def f(a, b): pass", "a task takes the message as its one parameter"),
        ("def f(a: 'Missing'): pass", "cannot resolve its annotations"),
    ],
)
def test_unsupported_signatures_fail_at_registration(source, error):
    namespace = {"Order": Order, "Message": Message, "Opaque": Opaque, "StdTypedDict": StdTypedDict}
    exec(source, namespace)  # one function per case, each with its own signature
    with pytest.raises(RegistryError, match=error) as caught:
        registry_with(namespace["f"])
    assert "@task('t')" in str(caught.value)


def test_a_batch_task_takes_a_list_of_the_payload_type():
    def rows(orders: Order) -> None: ...

    with pytest.raises(RegistryError, match=r"must be list\[X\]"):
        registry_with(rows, batch_size=10)


def test_the_adapter_is_built_once_at_registration():
    def place(order: Order) -> None: ...

    spec = registry_with(place).get("t")
    assert spec.signature.typed and spec.signature.json_schema()["title"] == "Order"


# -- batches, async --------------------------------------------------------------------------------


def test_a_batch_rejects_each_invalid_message_alone_and_runs_the_rest():
    calls = []

    def rows(orders: list[Order], msgs: list[Message]) -> BatchResult:
        calls.append(([o.order_id for o in orders], [m.message_id for m in msgs]))
        result = BatchResult()
        result.reject(msgs[1], "no such customer")
        return result

    payloads = [{"order_id": "a", "amount": 1}, {"amount": 2}, {"order_id": "c", "amount": 3}, {"order_id": "d", "amount": 4}]
    batch = BatchJob("t", tuple(Job(i, "t", msg(i, p)) for i, p in enumerate(payloads, 1)))
    results = run_batch(batch, registry_with(rows, batch_size=10), Log())
    assert calls == [(["a", "c", "d"], ["m1", "m3", "m4"])]
    assert [r.seq for r in results] == [1, 2, 3, 4]
    assert [r.outcome for r in results] == [Outcome.SUCCESS, Outcome.REJECT, Outcome.REJECT, Outcome.SUCCESS]
    assert "order_id: Field required" in results[1].error and results[2].error == "Reject: no such customer"


def test_a_batch_of_only_invalid_messages_never_calls_the_task():
    def rows(orders: list[Order]) -> None:
        raise AssertionError("never runs")

    batch = BatchJob("t", (Job(1, "t", msg(1, b"{")), Job(2, "t", msg(2, {}))))
    results = run_batch(batch, registry_with(rows, batch_size=10), Log())
    assert [r.outcome for r in results] == [Outcome.REJECT, Outcome.REJECT]


def run_async(registry: Registry, units: list) -> dict[int, Result]:
    ours, theirs = socket.socketpair()
    runner = AsyncRunner(theirs, None, registry, Log(), 1)  # type: ignore[arg-type]
    pending = collections.deque(units)
    runner.run(pending)
    theirs.close()
    reader = result_reader()
    ours.settimeout(5)
    while data := ours.recv(1 << 16):
        reader.feed(data)
    ours.close()
    return {r.seq: r for r in reader.take()}


def test_async_tasks_and_async_batches_are_typed_too():
    seen = []

    async def place(order: Order, m: Message) -> None:
        await asyncio.sleep(0)
        seen.append(order.order_id)

    async def rows(orders: list[Order]) -> None:
        seen.extend(o.order_id for o in orders)

    registry = registry_with(place)
    registry.register("rows", rows, TaskOptions(batch_size=5))
    units = [
        Job(1, "t", msg(1, {"order_id": "a", "amount": 1})),
        Job(2, "t", msg(2, {"order_id": "b", "amount": -1})),
        BatchJob("rows", (Job(3, "rows", msg(3, {"order_id": "c", "amount": 1})), Job(4, "rows", msg(4, b"[]")))),
    ]
    results = run_async(registry, units)
    assert {seq: r.outcome for seq, r in results.items()} == {1: Outcome.SUCCESS, 2: Outcome.REJECT, 3: Outcome.SUCCESS, 4: Outcome.REJECT}
    assert sorted(seen) == ["a", "c"]


def test_a_return_annotation_that_does_not_resolve_and_partials_and_callables_stay_plain():
    import functools

    def handler(msg: Message) -> NotImportedHere:  # type: ignore[name-defined]  # noqa: F821
        return None

    class Callable:
        def __call__(self, msg: Message) -> None: ...

    for func in (handler, functools.partial(lambda prefix, m: None, "p"), Callable()):
        assert not registry_with(func).get("t").signature.typed
    assert run(handler, b"").outcome is Outcome.SUCCESS


def test_a_callable_object_can_be_typed():
    class Placer:
        def __call__(self, order: Order) -> None:
            assert isinstance(order, Order)

    assert registry_with(Placer()).get("t").signature.typed
    assert run(Placer(), {"order_id": "x", "amount": 1}).outcome is Outcome.SUCCESS
