"""The worker's event loop, in-process over a socketpair: coroutines together, timeouts, batches."""

from __future__ import annotations

import asyncio
import collections
import signal
import socket

import pytest

from consumerd.ipc.framing import encode_units, job_reader, result_reader
from consumerd.ipc.records import BatchJob, Job, Outcome, Result
from consumerd.message import Message
from consumerd.worker import coroutines as asyncrun
from consumerd.worker.coroutines import AsyncRunner
from consumerd.worker.registry import Registry


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.events.append((event, fields))


def msg(i: int) -> Message:
    return Message(f"m{i}", b"", {}, None, None, "", "s")


@pytest.fixture(params=["asyncio", "uvloop"])
def runner(request, monkeypatch):
    if request.param == "asyncio":
        monkeypatch.setattr(asyncrun, "_loop_factory", lambda: asyncio.new_event_loop)
    else:
        uvloop = pytest.importorskip("uvloop")
        monkeypatch.setattr(asyncrun, "_loop_factory", lambda: uvloop.new_event_loop)
    previous = signal.getsignal(signal.SIGTERM)
    ours, theirs = socket.socketpair()
    registry = Registry()
    seen: list[str] = []

    async def wait(m: Message) -> None:
        seen.append(f"start {m.message_id}")
        await asyncio.sleep(0.2)
        seen.append(f"end {m.message_id}")

    async def hang(m: Message) -> None:
        await asyncio.sleep(60)

    async def boom(m: Message) -> None:
        raise KeyError("nope")

    async def rows(ms: list[Message]) -> dict:
        return {ms[0].message_id: ValueError("first row is bad")}

    for name, func in (("wait", wait), ("hang", hang), ("boom", boom), ("rows", rows)):
        registry.register(name, func)
    yield AsyncRunner(theirs, job_reader(), registry, Log(), 1), ours, seen
    ours.close()
    theirs.close()
    signal.signal(signal.SIGTERM, previous)


def results_from(sock: socket.socket, n: int) -> list[Result]:
    reader = result_reader()
    out: list[Result] = []
    while len(out) < n:
        reader.feed(sock.recv(1 << 16))
        out += reader.take()
    return out


def test_coroutines_overlap_and_jobs_arriving_meanwhile_join_them(runner):
    run, ours, seen = runner
    pending = collections.deque([Job(1, "wait", msg(1), 10.0), Job(2, "wait", msg(2), 10.0)])
    ours.sendall(encode_units([Job(3, "wait", msg(3), 10.0)]))  # arrives while the first two run
    assert run.run(pending) == 3
    assert seen[:3] == ["start m1", "start m2", "start m3"]  # all three started before any ended
    assert sorted(r.seq for r in results_from(ours, 3)) == [1, 2, 3]


def test_a_coroutine_past_its_timeout_is_cancelled_and_reported_as_a_timeout(runner):
    run, ours, _ = runner
    assert run.run(collections.deque([Job(1, "hang", msg(1), 0.1), Job(2, "boom", msg(2), 10.0)])) == 2
    by_seq = {r.seq: r for r in results_from(ours, 2)}
    assert by_seq[1].outcome is Outcome.TIMEOUT and "cancelled after 0.1s" in by_seq[1].error
    assert by_seq[2].outcome is Outcome.ERROR and by_seq[2].error == "KeyError: 'nope'"  # its own failure only


def test_an_async_batch_reports_one_result_per_message(runner):
    run, ours, _ = runner
    batch = BatchJob("rows", (Job(1, "rows", msg(1)), Job(2, "rows", msg(2))), 10.0)
    assert run.run(collections.deque([batch])) == 1
    by_seq = {r.seq: r for r in results_from(ours, 2)}
    assert by_seq[1].outcome is Outcome.ERROR and "first row is bad" in by_seq[1].error
    assert by_seq[2].outcome is Outcome.SUCCESS


def test_the_loop_stops_at_a_sync_job_and_leaves_it_for_the_caller(runner):
    run, ours, _ = runner
    run.registry.register("plain", lambda m: None)
    pending = collections.deque([Job(1, "wait", msg(1), 10.0), Job(2, "plain", msg(2), 10.0)])
    assert run.run(pending) == 1
    assert [u.seq for u in pending] == [2]


def test_a_closed_channel_ends_the_loop_once_coroutines_finish(runner):
    run, ours, _ = runner
    ours.shutdown(socket.SHUT_WR)
    assert run.run(collections.deque([Job(1, "wait", msg(1), 10.0)])) == 1
    assert run.closed
