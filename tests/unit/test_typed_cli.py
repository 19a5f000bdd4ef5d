"""`consumerd tasks --schema` and `consumerd publish --task`: the payload types at the command line."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from consumerd.cli import main
from consumerd.errors import ExitCode
from consumerd.worker.registry import REGISTRY

MODULE = """
    from pydantic import BaseModel

    from consumerd import Message, task


    class Order(BaseModel):
        order_id: str
        amount: int


    @task("place")
    def place(order: Order, msg: Message) -> None: ...


    @task("rows", batch_size=10)
    def rows(orders: list[Order]) -> None: ...


    @task("plain")
    def plain(msg: Message) -> None: ...
"""


@pytest.fixture
def config(tmp_path, monkeypatch):
    (tmp_path / "cli_typed_tasks.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "consumerd.toml"
    path.write_text('[pubsub]\nproject = "p"\nsubscription = "orders-sub"\n\n[tasks]\nmodules = ["cli_typed_tasks"]\n')
    yield str(path)
    sys.modules.pop("cli_typed_tasks", None)
    REGISTRY.clear()


def test_tasks_schema_prints_each_typed_tasks_json_schema(config, capsys):
    assert main(["tasks", "--config", config, "--schema"]) == ExitCode.OK
    schemas = json.loads(capsys.readouterr().out)
    assert set(schemas) == {"place", "rows"}  # `plain` takes any payload
    assert schemas["place"]["title"] == "Order" and schemas["place"]["required"] == ["order_id", "amount"]
    assert schemas["rows"] == schemas["place"]  # a batch task's schema is one message's


@pytest.mark.parametrize("task", ["place", "rows"])
def test_publish_refuses_a_payload_the_task_would_reject(config, capsys, task):
    code = main(["publish", "--config", config, "--topic", "t", "--task", task, '{"order_id": 1}'])
    assert code == ExitCode.DATAERR == 65
    err = capsys.readouterr().err
    assert f"not published: task {task!r}: payload is not a valid Order: 2 validation errors" in err
    assert "order_id: Input should be a valid string" in err and "amount: Field required" in err


def test_publish_refuses_an_unknown_task_and_a_disagreeing_route_attribute(config, capsys):
    assert main(["publish", "--config", config, "--topic", "t", "--task", "nope", "{}"]) == ExitCode.CONFIG
    assert "no such task" in capsys.readouterr().err
    assert main(["publish", "--config", config, "--topic", "t", "--task", "place", "--attr", "task=plain", "{}"]) == ExitCode.CONFIG
    assert "disagree" in capsys.readouterr().err


def test_publish_with_a_valid_payload_sets_the_route_attribute(config, monkeypatch):
    sent = []

    class Publisher:
        def publish(self, topic, data, **attributes):
            sent.append((topic, data, attributes))

            class Done:
                def result(self, timeout):
                    return "id-1"

            return Done()

        def stop(self) -> None: ...

    class PubSub:
        def __init__(self, settings) -> None: ...

        def batch_publisher(self):
            return Publisher()

    import consumerd.adapters.pubsub.client as client

    monkeypatch.setattr(client, "PubSub", PubSub)
    payload = '{"order_id": "o1", "amount": 3}'
    assert main(["publish", "--config", config, "--topic", "t", "--task", "place", "--attr", "k=v", payload]) == ExitCode.OK
    assert sent == [("projects/p/topics/t", payload.encode(), {"k": "v", "task": "place"})]
