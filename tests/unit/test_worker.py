"""The worker is the boundary between task code and consumerd: whatever a task does becomes a valid Result."""

import datetime

import pytest

from consumerd.errors import Retry
from consumerd.ipc.records import MAX_ERROR_CHARS, Job, Outcome, Result
from consumerd.message import Message
from consumerd.worker.child import run_job
from consumerd.worker.registry import Registry
from tests.unit.fakes import Log

MSG = Message("m1", b"", {}, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), None, "", "s")


def run(func) -> Result:
    registry = Registry()
    registry.register("t", func)
    result = run_job(Job(1, "t", MSG), registry, Log())
    assert Result.decode(result.encode()) == result  # whatever happened, it crosses the boundary intact
    return result


@pytest.mark.parametrize("after", [float("nan"), float("inf"), float("-inf"), -1, "soon", None])
def test_retry_with_a_delay_that_is_not_finite_and_non_negative_is_an_ordinary_failure(after):
    def task(_msg):
        raise Retry(after=after) if not isinstance(after, str | None) else Retry.__new__(Retry)

    result = run(task)
    assert result.outcome is Outcome.ERROR and "finite number >= 0" in result.error
    assert result.retry_after is None


def test_a_valid_retry_keeps_its_delay():
    def task(_msg):
        raise Retry(after=2.5)

    result = run(task)
    assert (result.outcome, result.error, result.retry_after) == (Outcome.RETRY, "retry requested after 2.5s", 2.5)


def test_a_5_mb_exception_message_is_cut_to_4_kib():
    def task(_msg):
        raise ValueError("ü" * 5_000_000)

    result = run(task)
    assert result.outcome is Outcome.ERROR and len(result.error) == MAX_ERROR_CHARS
    assert len(result.encode()) < 64 * 1024


def test_an_exception_whose_str_raises_still_reports():
    class Nasty(Exception):
        def __str__(self):
            raise RuntimeError("no")

    assert run(lambda _m: (_ for _ in ()).throw(Nasty())).error == "Nasty: <unprintable>"
