"""The examples docs/tasks.md includes (pymdownx.snippets) exist and do what the page says."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from consumerd.ipc.records import Job, Outcome
from consumerd.message import Message
from consumerd.worker.child import run_job
from consumerd.worker.registry import REGISTRY
from tests.unit.fakes import Log

ROOT = Path(__file__).resolve().parents[2]
INCLUDED = re.compile(r'^--8<-- "([^"]+)"$', re.MULTILINE)


def included(page: str) -> list[str]:
    return INCLUDED.findall((ROOT / "docs" / page).read_text())


def test_every_included_example_exists():
    # snippets leaves a missing file out silently, even under --strict
    paths = included("tasks.md")
    assert {"examples/typed_payload.py", "examples/sentry_hooks.py"} <= set(paths)
    assert [p for p in paths if not (ROOT / p).is_file()] == []


@pytest.fixture
def example():
    spec = importlib.util.spec_from_file_location("typed_payload_example", ROOT / "examples" / "typed_payload.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    yield REGISTRY
    REGISTRY.clear()


def test_the_typed_payload_example_validates_then_runs(example):
    log = Log()
    results = []
    example.success_hooks.append(lambda success: results.append(success.result))
    good = {"order_id": "A-1", "items": [{"sku": "book", "quantity": 2}, {"sku": "pen", "quantity": 3}]}
    bad = {"order_id": "A-2", "items": [{"sku": "book", "quantity": 0}]}
    ok = run_job(Job(1, "place_order", Message("m1", json.dumps(good).encode(), {}, None, None, "", "s")), example, log)
    rejected = run_job(Job(2, "place_order", Message("m2", json.dumps(bad).encode(), {}, None, None, "", "s")), example, log)
    assert ok.outcome is Outcome.SUCCESS and results == ["order A-1: 5 items (message m1)"]
    assert rejected.outcome is Outcome.REJECT
    assert (
        rejected.error == "PayloadError: payload is not a valid Order: 1 validation error: items.0.quantity: Input should be greater than 0"
    )
