"""The examples the docs pages include (pymdownx.snippets) run and do what their pages say.

Each page shows one file under examples/, included whole, so the page cannot drift from the file
tested here. The examples run in-process with consumerd.testing.run_task (the Sentry recipe in a
forked worker, where its worker hooks run), against the process-wide registry they register into.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from consumerd.message import Message
from consumerd.testing import TaskOutcome, run_task
from consumerd.worker.registry import REGISTRY, task
from tests.support.sentry import events, sentry  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[2]
INCLUDED = re.compile(r'^--8<-- "([^"]+)"$', re.MULTILINE)
PAGES = {
    "testing.md": "examples/test_refund.py",
    "payloads.md": "examples/typed_payload.py",
    "pipelines.md": "examples/pipeline.py",
    "error-reporting.md": "examples/sentry_hooks.py",
}


def included(page: str) -> list[str]:
    return INCLUDED.findall((ROOT / "docs" / page).read_text())


def one(outcome: TaskOutcome | list[TaskOutcome]) -> TaskOutcome:
    assert isinstance(outcome, TaskOutcome)
    return outcome


@pytest.fixture
def load() -> Iterator[Callable[[str], ModuleType]]:
    """Import an example by path (its tasks and hooks register); the registry is emptied afterwards."""
    names: list[str] = []

    def load(path: str) -> ModuleType:
        name = f"doc_example_{Path(path).stem}"
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pydantic resolves the models' annotations through it
        names.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    REGISTRY.clear()
    for name in names:
        sys.modules.pop(name, None)


# -- the pages include their examples -------------------------------------------------------------
def test_each_page_includes_its_one_example_whole():
    assert {page: included(page) for page in PAGES} == {page: [example] for page, example in PAGES.items()}


def test_every_included_file_exists():
    # what the build checks (check_paths), also where mkdocs is not installed
    paths = [path for page in (ROOT / "docs").rglob("*.md") for path in INCLUDED.findall(page.read_text())]
    assert [path for path in paths if not (ROOT / path).is_file()] == []


def test_the_task_pages_are_pointers_from_writing_tasks():
    tasks = (ROOT / "docs" / "tasks.md").read_text()
    assert included("tasks.md") == []  # each example lives on its own page only
    assert all(f"]({page})" in tasks for page in PAGES)


# -- Testing your tasks ---------------------------------------------------------------------------
def test_the_testing_example_passes(load):
    example = load(PAGES["testing.md"])
    tests = [value for name, value in vars(example).items() if name.startswith("test_") and callable(value)]
    assert len(tests) == 5
    for test in tests:
        test()


# -- Typed payloads -------------------------------------------------------------------------------
def test_the_typed_payload_example_validates_then_runs(load):
    load(PAGES["payloads.md"])
    returned: list[object] = []
    REGISTRY.success_hooks.append(lambda success: returned.append(success.result))
    good = {"order_id": "A-1", "items": [{"sku": "book", "quantity": 2}, {"sku": "pen", "quantity": 3}]}
    assert one(run_task("place_order", good, message_id="m1")).acked
    assert returned == ["order A-1: 5 items (message m1)"]  # the Order, and the Message beside it


def test_an_invalid_typed_payload_is_rejected_with_where_and_why_never_the_values(load):
    load(PAGES["payloads.md"])
    bad = one(run_task("place_order", {"order_id": "A-2", "items": [{"sku": "secret-sku", "quantity": 0}]}))
    reason = "PayloadError: payload is not a valid Order: 1 validation error: items.0.quantity: Input should be greater than 0"
    assert bad.rejected == reason and f"`{reason}`" in (ROOT / "docs" / "payloads.md").read_text()
    assert "secret-sku" not in bad.rejected
    assert (one(run_task("place_order", b"not json")).rejected or "").startswith("PayloadError:")


# -- Pipelines: publishing from a task (needs consumerd.publish) --------------------------------------
def test_the_pipeline_example_passes(load):
    example = load(PAGES["pipelines.md"])
    example.test_an_order_goes_to_the_next_stage_enriched()
    example.test_a_big_order_is_also_sent_for_review()


def test_a_pipeline_output_is_the_models_json_and_a_failed_publish_names_its_topic(load):
    example = load(PAGES["pipelines.md"])
    order = example.Order(order_id="A-3", customer="c-2", amount=500)
    [out] = one(run_task("enrich", order, publish_topics=["orders-enriched"])).published
    expected = example.EnrichedOrder(order_id="A-3", customer="c-2", amount=500, tier="standard")
    assert example.EnrichedOrder.model_validate_json(out.data) == expected
    refused = one(run_task("enrich", order, publish_topics=["orders-review"]))
    assert refused.failed is not None and refused.failed.startswith("PublishError:") and "orders-enriched" in refused.failed


def test_publish_outside_a_task_raises(load):
    load(PAGES["pipelines.md"])
    from consumerd import publish

    with pytest.raises(RuntimeError):
        publish("orders-enriched", b"{}")


# -- Error reporting: the Sentry recipe with the real sentry-sdk, against a loopback stand-in ---------
def test_a_failed_attempt_reaches_sentry_tagged_with_the_task_and_message_id(load, sentry, monkeypatch):  # noqa: F811
    pytest.importorskip("sentry_sdk")
    dsn, received = sentry
    monkeypatch.setenv("SENTRY_DSN", dsn)  # what workers.environment gives the workers
    load(PAGES["error-reporting.md"])

    @task("charge")
    def charge(msg: Message) -> None:
        raise ValueError("the card was declined")

    # A forked worker: the start hook (sentry_sdk.init), the task, the failure hook, the stop hook (flush).
    outcome = one(run_task("charge", b"{}", isolated=True, message_id="m-sentry-1"))
    assert outcome.failed == "ValueError: the card was declined"
    deadline = time.monotonic() + 10
    while not events(received) and time.monotonic() < deadline:
        time.sleep(0.05)
    [event] = events(received)
    assert event["tags"] == {"task": "charge", "message_id": "m-sentry-1", "fate": "retry"}
    assert event["extra"]["attempt"] == 1
    [exception] = event["exception"]["values"]
    assert exception["type"] == "ValueError" and exception["value"] == "the card was declined"
