"""Per-task options: validated where they are declared and where they are received; caps and policies."""

import pytest

from consumerd.errors import RegistryError
from consumerd.ipc.held import InFlight
from consumerd.ipc.records import TaskOptions
from consumerd.message import Message
from consumerd.policy.backlog import Backlog
from consumerd.worker.registry import Registry


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (TaskOptions(timeout=0), "timeout"),
        (TaskOptions(timeout=float("nan")), "timeout"),
        (TaskOptions(concurrency=0), "concurrency"),
        (TaskOptions(concurrency=2.5), "concurrency"),  # type: ignore[arg-type]
        (TaskOptions(min_backoff=-1), "min_backoff"),
        (TaskOptions(max_backoff=601), "max_backoff"),
        (TaskOptions(min_backoff=10, max_backoff=5), "must not exceed"),
        (TaskOptions(max_attempts=0), "max_attempts"),
        (TaskOptions(batch_size=0), "batch_size"),
        (TaskOptions(batch_size=1001), "batch_size"),
        (TaskOptions(batch_size=10, batch_wait=-1), "batch_wait"),
        (TaskOptions(batch_wait=1.0), "batch_wait needs batch_size"),
    ],
)
def test_bad_options_are_a_registry_error_naming_the_task(options, problem):
    with pytest.raises(RegistryError, match=problem) as err:
        Registry().register("resize", lambda m: None, options)
    assert "resize" in str(err.value)


def _inflight(i: int, task: str) -> InFlight:
    return InFlight(f"a{i}", Message(f"m{i}", b"", {}, None, None, "", "s"), task, 1, 0.0)


def test_a_capped_task_waits_while_other_tasks_overtake_it():
    backlog = Backlog()
    backlog.task_caps = {"capped": 1}
    for i, task in enumerate(["capped", "capped", "other", "capped", "other"]):
        backlog.enqueue(_inflight(i, task))
    first = backlog.next_ready(0.0)
    assert first is not None and first.task == "capped"
    started = [backlog.next_ready(0.0) for _ in range(3)]
    assert [s.task if s else None for s in started] == ["other", "other", None]  # capped ones wait
    backlog.finished(first)
    again = backlog.next_ready(0.0)
    assert again is not None and again.message.message_id == "m1"  # then the next capped, in order
