"""The supervisor's loop over fakes and a fake clock: admission, settle, drain, reload, safety net, limits."""

from __future__ import annotations

import signal

import pytest

from consumerd.errors import ExitCode
from consumerd.ipc.records import Outcome, TaskOptions
from consumerd.pool.handles import Lost
from consumerd.pool.pool import KillReason, WorkerExited
from consumerd.supervisor.intake import MAX_FORWARDING
from consumerd.supervisor.loop import State
from tests.unit.fakes import Harness, write_config


@pytest.fixture
def h(tmp_path) -> Harness:
    return Harness(write_config(tmp_path / "c.toml", "[workers]\nconcurrency = 2\n"))


def test_a_pulled_message_runs_and_is_acked_only_after_success(h):
    received = h.message()
    h.pull(received)
    assert h.pool.worker_running("m1")
    assert h.acker.acked == []
    h.finish("m1")
    assert h.acker.acked == [received.ack_id]
    assert h.stream.counters.succeeded == 1 and h.log.events("message.done")[0]["message_id"] == "m1"


def test_a_failure_is_given_back_with_its_backoff_and_a_retry_with_the_asked_delay(h):
    failing, retrying = h.message(), h.message()
    h.pull(failing, retrying)
    h.finish("m1", Outcome.ERROR, error="ValueError: no")
    h.finish("m2", Outcome.RETRY, retry_after=42.0)
    [(ack1, delay1), (ack2, delay2)] = h.acker.modacked
    assert (ack1, ack2) == (failing.ack_id, retrying.ack_id)
    assert 10 <= delay1 <= 10 and delay2 == 42  # attempt 1: the floor (min_backoff = 10)
    assert h.acker.acked == []


def test_unknown_task_and_too_many_attempts_are_poison_held_at_max_backoff_without_a_dead_letter_topic(h):
    h.pull(h.message(task="nope"))
    assert h.acker.modacked == [("ack-m1", 600)]
    assert "no task named 'nope'" in h.log.events("message.failed")[0]["error"]
    assert h.pool.running() == []


def test_crash_timeout_and_our_own_kills_map_to_their_outcomes(h):
    h.pull(h.message(), h.message())
    h.crash("m1", KillReason.TIMEOUT)
    h.crash("m2", KillReason.DRAIN_TIMEOUT)
    outcomes = [e["outcome"] for e in h.log.events("message.failed")]
    assert outcomes == ["timeout", "interrupted"]
    assert h.acker.modacked[1] == ("ack-m2", 0)  # ours: back at once, for another consumer


def test_drain_gives_back_what_waits_lets_running_tasks_finish_then_stops(h):
    h.stream.intake.task_seconds.add(0.001)  # short tasks: messages may wait here
    h.pull(*(h.message() for _ in range(5)))
    assert len(h.pool.running()) == 2 and len(h.stream.backlog) == 3
    h.signal(signal.SIGTERM)
    assert h.sup.state is State.DRAINING and h.components.puller.stopped
    assert sorted(h.acker.modacked) == [("ack-m3", 0), ("ack-m4", 0), ("ack-m5", 0)]
    h.finish("m1")
    assert h.sup.state is State.DRAINING
    h.finish("m2")
    assert h.sup.state is State.STOPPED
    assert h.acker.acked == ["ack-m1", "ack-m2"]


def test_a_drain_ends_with_the_configured_kill_grace_and_asks_systemd_for_all_three_figures(tmp_path):
    h = Harness(write_config(tmp_path / "c.toml", "[shutdown]\ndrain_timeout = 3\nkill_grace = 2\nflush_timeout = 4\n"))
    extended: list[float] = []
    h.sup.notifier.extend_timeout = extended.append  # type: ignore[method-assign]
    h.pull(h.message())
    h.signal(signal.SIGTERM)
    assert extended == [3 + 2 + 4]
    h.clock.advance(3.1)
    h.sup.tick()
    assert h.pool.killed == [(100, KillReason.DRAIN_TIMEOUT)] and h.pool.kill_graces == [2]


def test_a_second_sigterm_stops_running_tasks_quickly(h):
    h.pull(h.message())
    h.signal(signal.SIGTERM)
    h.signal(signal.SIGTERM)
    assert h.sup.state is State.STOPPING and h.pool.killed == [(100, KillReason.SECOND_SIGNAL)] or h.pool.killed


def test_reload_applies_concurrency_and_rejects_more_than_the_descriptor_limit_holds(h, tmp_path):
    write_config(tmp_path / "c.toml", "[workers]\nconcurrency = 3\n")
    h.signal(signal.SIGHUP)
    assert h.sup.concurrency == 3 and h.pool.size == 3
    h.sup.max_concurrency = 5
    write_config(tmp_path / "c.toml", "[workers]\nconcurrency = 6\n")
    h.signal(signal.SIGHUP)
    assert h.sup.concurrency == 3
    assert "exceeds 5" in h.log.events("reload.rejected")[0]["error"]


def test_a_sigttin_storm_stops_at_the_largest_allowed_concurrency(h):
    h.sup.max_concurrency = 6
    for _ in range(1000):
        h.sup.signals.record(signal.SIGTTIN)
    h.sup.tick()
    assert h.sup.concurrency == 6 and len(h.pool.workers) == 6
    assert len(h.log.events("workers.resize_refused")) == 1000 - 4


def test_the_safety_net_fails_one_message_and_keeps_the_loop_alive(h):
    h.acker.fail_next_acks = 1
    h.pull(h.message(), h.message())
    h.finish("m1")  # acking it raises inside settle
    [error] = h.log.events("daemon.error")
    assert error["message_id"] == "m1" and "ack exploded" in error["error"]
    assert h.sup.state is State.RUNNING and h.sup.exit_code is ExitCode.OK
    h.finish("m2")
    assert h.acker.acked == ["ack-m2"]


def test_more_than_a_few_internal_errors_in_a_minute_is_a_controlled_stop_with_exit_70(h):
    h.stream.intake.task_seconds.add(0.001)
    h.acker.fail_next_acks = 100
    h.pull(*(h.message() for _ in range(10)))
    for _ in range(6):
        running = h.pool.running()
        if not running:
            break
        h.finish(running[0].message.message_id)
    assert h.sup.exit_code is ExitCode.SOFTWARE
    assert h.log.events("daemon.fatal")
    assert h.sup.state in (State.STOPPING, State.STOPPED)
    assert len(h.stream.backlog) == 0  # every queued message was given back
    h.sup.shutdown()
    assert h.stream.backlog.held_bytes == 0 or h.sup.pool.running() == []


def test_a_lapsed_lease_is_dropped_before_it_starts_not_run(h):
    h.stream.intake.task_seconds.add(0.001)
    h.pull(h.message(), h.message(), h.message())
    assert len(h.stream.backlog) == 1
    h.clock.advance(30)  # the loop was frozen past the 10 s ack deadline: no renewal happened
    h.finish("m1")
    assert [e["message_id"] for e in h.log.events("lease.lapsed")] == ["m3"]
    assert h.stream.counters.lease_lapsed == 1
    assert all(ack != "ack-m3" for ack, _ in h.acker.modacked) and "ack-m3" not in h.acker.acked
    assert "m3" not in [i.message.message_id for i in h.pool.running()]


def test_empty_unknown_task_messages_with_a_stuck_dead_letter_publish_stay_bounded(tmp_path):
    h = Harness(write_config(tmp_path / "c.toml", '[workers]\nconcurrency = 2\n[dead_letter]\ntopic = "dl"\n'))
    h.stream.intake.task_seconds.add(0.0001)  # the deepest prefetch: as many as 100 may wait
    offered = 0
    while offered < 2000:
        h.sup.tick()
        n = h.stream.intake.requested
        if n == 0:
            break  # the supervisor stopped asking: copies being dead-lettered count as busy
        h.pull(*(h.message(task="nope", data=b"") for _ in range(n)))
        offered += n
    forwarding = len(h.stream.settler.forwarding)
    assert offered < 2000 and forwarding == offered == len(h.components.forwarder.letters)
    # what two workers hold (a job running and 64 short ones queued behind it) + the prefetch ceiling
    assert h.stream.intake.worker_capacity() == 65
    assert forwarding <= 2 * 65 + 100
    for _ in range(100):
        h.clock.advance(1)
        h.sup.tick()
    assert h.stream.intake.requested == 0 and h.stream.counters.received == offered  # flat: nothing more pulled


def test_pulling_waits_while_the_forwarder_is_max_forwarding_behind(h):
    h.stream.settler.forwarding.update({f"a{i}": None for i in range(MAX_FORWARDING)})  # type: ignore[misc]
    assert h.stream.intake.next_pull(concurrency=1000, busy=0) == 0
    h.stream.settler.forwarding.clear()
    assert h.stream.intake.next_pull(concurrency=1000, busy=0) == 200  # one pull's most


def test_the_byte_budget_counts_attributes(tmp_path):
    h = Harness(write_config(tmp_path / "c.toml", "[workers]\nconcurrency = 1\n[flow]\nmax_inflight_bytes = 500\n"))
    h.pull(h.message(data=b"", big="v" * 600))
    assert h.stream.backlog.held_bytes > 600
    h.sup.tick()
    assert h.stream.intake.next_pull(1, 0) == 0  # the budget is spent by attributes alone


def test_ordering_holds_and_attempt_counts_are_pruned(tmp_path):
    h = Harness(write_config(tmp_path / "c.toml", "[workers]\nconcurrency = 1\n"), ordering=True)
    h.pull(h.message(key="k1"))
    h.finish("m1", Outcome.ERROR, error="x")
    assert "k1" in h.stream.backlog.blocked_until and len(h.stream.settler.attempts) == 1
    h.clock.advance(4000)
    h.sup.tick()
    assert h.stream.backlog.blocked_until == {} and len(h.stream.settler.attempts) == 0


def test_a_pull_answered_while_the_loop_was_frozen_is_dated_from_the_freeze(h):
    h.sup.tick()
    h.pull_sent_at = h.clock.now  # a long poll is out...
    h.clock.advance(30)  # ...when the loop freezes past the 10 s deadline; the answer comes meanwhile
    h.sup.tick()  # the first tick after the freeze: the puller thread has not posted yet
    h.pull(h.message(), h.message())
    assert sorted(e["message_id"] for e in h.log.events("lease.lapsed")) == ["m1", "m2"]
    assert h.pool.running() == [] and h.acker.acked == [] and h.acker.modacked == []


def test_a_pull_after_an_ordinary_idle_second_is_not_taken_for_a_freeze(h):
    for _ in range(5):
        h.sup.tick()  # each idle tick "sleeps" up to a second on the fake clock
    h.pull(h.message())
    assert h.log.events("lease.lapsed") == [] and [i.message.message_id for i in h.pool.running()] == ["m1"]


def test_a_long_poll_answered_after_a_short_stall_is_not_dropped(h):
    h.sup.tick()
    h.pull_sent_at = h.clock.now
    h.clock.advance(25)  # an ordinary long poll...
    h.sup.tick()
    h.clock.advance(3)  # ...then the loop stalls 3 s, and the pull is answered within it
    h.sup.tick()
    h.pull(h.message())
    assert h.log.events("lease.lapsed") == [] and [i.message.message_id for i in h.pool.running()] == ["m1"]


def test_pulls_are_sized_for_batches_only_while_batch_messages_arrive(h):
    h.stream.intake.set_tasks({"ok": TaskOptions(), "rows": TaskOptions(batch_size=50, batch_wait=1.0)})
    assert h.stream.intake.worker_capacity(h.clock()) == 1  # a loaded batch task alone changes nothing
    h.pull(h.message(task="rows"))
    assert h.stream.intake.worker_capacity(h.clock()) == 100  # two batches per worker: one runs, one waits
    h.clock.advance(11)
    assert h.stream.intake.worker_capacity(h.clock()) == 1


def test_jobs_queued_behind_a_crash_are_requeued_here_not_nacked(tmp_path):
    h = Harness(write_config(tmp_path / "c.toml", "[workers]\nconcurrency = 2\n"), ordering=True)
    h.pull(h.message(key="k1"), h.message(key="k2"))  # m1 (k1) and m2 (k2) start on the two workers
    h.pull(h.message(key="k1"), h.message(key="k3"))  # m3 (k1) waits for its key; m4 (k3) waits for a worker
    crashed = h.pool.worker_running("m1")
    first = h.stream.backlog.next_ready(h.clock())  # as if m4 had been queued behind m1 on its worker
    assert first is not None and first.message.message_id == "m4"
    m1, crashed.inflight = crashed.inflight, None
    del h.pool.workers[crashed.pid]
    lost = [Lost(m1, Outcome.CRASH, 0.5)]  # type: ignore[arg-type]
    h.sup.on_pool_events([WorkerExited(crashed, lost, [first], 9, None, "killed by SIGSEGV")])  # type: ignore[arg-type]
    assert ("ack-m4", 0) not in h.acker.modacked  # m4 never started: requeued here, not nacked
    assert [m.message.message_id for m in h.stream.backlog.waiting] == ["m4"]
    assert any(a == "ack-m3" and s > 0 for a, s in h.acker.modacked)  # m3 (k1) went back with m1's retry
