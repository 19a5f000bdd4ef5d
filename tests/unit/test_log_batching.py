"""The supervisor's loop writes a pass's log lines at once (`batched_log_lines`, `flush_logs`);
every other thread's lines, and every line outside the loop, are written and flushed as they come."""

import io
import json
import threading

import pytest

from consumerd import logsetup
from consumerd.logsetup import batched_log_lines, configure_logging, flush_logs, get_logger


class Recorder(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def events(self) -> list[str]:
        return [json.loads(line)["event"] for text in self.writes for line in text.splitlines()]


@pytest.fixture
def out():
    stream = Recorder()
    configure_logging("json", "info", stream=stream)
    yield stream
    configure_logging("json", "info", stream=io.StringIO())


def test_outside_the_loop_each_line_is_written_at_once(out):
    log = get_logger()
    log.info("one")
    log.info("two")
    assert out.events() == ["one", "two"] and len(out.writes) == 2


def test_the_loops_lines_wait_for_flush_logs_then_go_in_one_write(out):
    log = get_logger()
    with batched_log_lines():
        for n in range(5):
            log.info(f"line{n}")
        assert out.writes == []
        flush_logs()
        assert out.events() == [f"line{n}" for n in range(5)] and len(out.writes) == 1
        log.info("last")
    assert out.events()[-1] == "last", "leaving the loop writes what it held"


def test_another_threads_line_is_written_at_once_after_the_held_ones(out):
    log = get_logger()
    with batched_log_lines():
        log.info("held")
        thread = threading.Thread(target=lambda: log.info("from a thread"))
        thread.start()
        thread.join()
        assert out.events() == ["held", "from a thread"]
        log.info("held again")
        assert out.events() == ["held", "from a thread"]
    assert out.events() == ["held", "from a thread", "held again"]


def test_held_lines_are_bounded(out, monkeypatch):
    monkeypatch.setattr(logsetup, "MAX_PENDING", 1000)
    log = get_logger()
    with batched_log_lines():
        for n in range(30):
            log.info("x" * 40, n=n)
        assert out.writes, "past MAX_PENDING characters the held lines are written"
        assert sum(len(text) for text in out.writes) > 1000 - 200
        flush_logs()
    assert [json.loads(line)["n"] for text in out.writes for line in text.splitlines()] == list(range(30))


def test_a_broken_stream_drops_the_lines_and_the_loop_goes_on(out):
    class Broken(Recorder):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    configure_logging("json", "info", stream=Broken())
    with batched_log_lines():
        get_logger().info("lost")
        flush_logs()
    get_logger().info("lost too")
    configure_logging("json", "info", stream=out)
    get_logger().info("after")
    assert out.events() == ["after"], "what a broken stream could not take is dropped, not carried to the next"


def test_configuring_anew_writes_what_the_old_output_held(out):
    with batched_log_lines():
        get_logger().info("before the reload")
        configure_logging("json", "info", stream=io.StringIO())
    assert out.events() == ["before the reload"]
