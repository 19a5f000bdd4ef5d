"""New task code without a drain: SIGHUP with changed code, a broken change, and `run --reload`.

Each test writes its own task module (`codegen_tasks.py` under tmp_path, on the daemon's PYTHONPATH)
and rewrites it: every version records `done_<version>` in the ledger, so a message says which code
ran it. The 20 s task of the first test is the only long one.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.daemon import REPO

pytestmark = pytest.mark.integration

MODULE = """
import time

from consumerd import Message, task
from tests.support.tasks import record

VERSION = "{version}"


@task("work")
def work(msg: Message) -> None:
    record("start", msg)
    time.sleep(float(msg.json().get("seconds", 0)) if msg.data else 0)
    record("done_" + VERSION, msg)
"""


_WRITES = itertools.count(1)


def write_module(directory: Path, version: str, broken: bool = False) -> None:
    """A new version of the task module (a different size each time: a new mtime in the same second
    would not always do for Python's bytecode cache, which compares whole seconds and the size)."""
    text = MODULE.format(version=version) + "# " + "x" * next(_WRITES) + "\n"
    (directory / "codegen_tasks.py").write_text(text + ("\ndef broken(:\n    pass\n" if broken else ""))


def start(make_daemon, sub: str, tmp_path: Path, concurrency: int = 2, run_args: tuple[str, ...] = ()):
    env = {"PYTHONPATH": f"{REPO}:{tmp_path}", "CONSUMERD_CONTROL__SOCKET": str(tmp_path / "control.sock")}
    daemon = make_daemon(sub, env=env, run_args=run_args, workers={"concurrency": concurrency}, tasks={"modules": ["codegen_tasks"]})
    daemon.wait_ready()
    return daemon


def wait_started(ledger, mid: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while mid not in ledger.ids("start"):
        assert time.monotonic() < deadline, f"{mid} did not start: {ledger.lines()}"
        time.sleep(0.05)


def pids_of(ledger, event: str, ids: set[str]) -> set[str]:
    return {parts[3] for parts in ledger.lines() if parts[0] == event and parts[1] in ids}


def status(tmp_path: Path, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "consumerd", "status", "--socket", str(tmp_path / "control.sock"), *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_sighup_with_changed_code_runs_new_messages_on_new_workers_while_a_20s_task_finishes_on_the_old(
    broker, topic_sub, make_daemon, ledger, tmp_path
):
    topic, sub = topic_sub(ack_deadline=10)
    write_module(tmp_path, "v1")
    daemon = start(make_daemon, sub, tmp_path, concurrency=3)
    [long] = broker.publish(topic, data={"seconds": 20}, task="work")
    wait_started(ledger, long)
    load = broker.publish(topic, 40, data={"seconds": 0.1}, task="work")  # flowing across the switch
    wait_started(ledger, load[0])
    write_module(tmp_path, "v2")
    mark = daemon.mark()
    sent = time.monotonic()
    daemon.signal(signal.SIGHUP)
    [changed] = daemon.wait_for("code.changed", since=mark)
    [ready] = daemon.wait_for("code.ready", since=mark)
    took = time.monotonic() - sent
    assert changed["changed"] == [str(tmp_path / "codegen_tasks.py")] and changed["trigger"] == "reload"
    assert ready["generation"] == 2 and "work" in ready["tasks"]
    [done] = daemon.wait_for("reload.done", since=mark)
    assert done["generation"] == 2

    # While the old task runs: two generations, never more workers than the concurrency.
    answer = json.loads(status(tmp_path, "--json"))
    generations = {g["generation"]: g for g in answer["generations"]}
    assert generations[1]["stage"] == "finishing" and generations[1]["busy"] == 1
    assert generations[2]["stage"] == "current" and len(generations[2]["workers"]) <= 2
    assert [j["generation"] for j in answer["running"] if j["message_id"] == long] == [1]
    text = status(tmp_path)
    assert "code generation 2 (current" in text and "code generation 1 (finishing" in text and " GEN " in text

    after = broker.publish(topic, 20, data={"seconds": 0.05}, task="work")
    everything = {long, *load, *after}
    daemon.wait_for_ids("message.done", everything, timeout=60)
    assert set(after) <= set(ledger.ids("done_v2")), "messages after the reload run the new code"
    assert long in ledger.ids("done_v1"), "the task started before it finished on the old code"
    assert not pids_of(ledger, "done_v2", set(after)) & pids_of(ledger, "done_v1", {long}), "the new code runs in new workers"
    [retired] = daemon.wait_for("code.retired", generation=1, timeout=10)
    assert retired["reason"] == "its workers finished"
    stopped = daemon.stop()
    assert stopped is not None
    assert (stopped["succeeded"], stopped["failed"], stopped["nacked_unstarted"]) == (len(everything), 0, 0), "nothing given back"
    assert daemon.select("message.failed") == []
    done_ids = [mid for event in ("done_v1", "done_v2") for mid in ledger.ids(event)]
    assert sorted(done_ids) == sorted(everything), "each message ran exactly once"
    print(f"\ncode reload under load: SIGHUP to code.ready {took:.2f} s (fork server ready after {ready['took_s']} s)")


def test_new_code_that_does_not_import_is_rejected_and_the_old_code_keeps_serving(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    write_module(tmp_path, "v1")
    daemon = start(make_daemon, sub, tmp_path)
    before = broker.publish(topic, 2, task="work")
    daemon.wait_for_ids("message.done", set(before))
    write_module(tmp_path, "v2", broken=True)
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    [rejected] = daemon.wait_for("reload.rejected", since=mark)
    assert "SyntaxError" in rejected["error"] and "codegen_tasks" in rejected["error"]
    assert 'codegen_tasks.py", line' in rejected["exception"] and "SyntaxError" in rejected["exception"]  # the traceback
    assert daemon.select("code.ready", since=mark) == [] and daemon.select("reload.done", since=mark) == []
    later = broker.publish(topic, 4, task="work")
    daemon.wait_for_ids("message.done", set(later))
    assert set(later) <= set(ledger.ids("done_v1")), "the old code keeps serving"
    assert pids_of(ledger, "done_v1", set(later)) <= pids_of(ledger, "done_v1", set(before)), "in the same workers"

    write_module(tmp_path, "v3")  # fixed: the next reload takes it
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("code.ready", since=mark, generation=3)
    fixed = broker.publish(topic, 2, task="work")
    daemon.wait_for_ids("message.done", set(fixed))
    assert set(fixed) <= set(ledger.ids("done_v3"))


def test_run_reload_changes_the_behaviour_of_the_next_message_within_2s_of_an_edit(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    write_module(tmp_path, "v1")
    daemon = start(make_daemon, sub, tmp_path, run_args=("--reload",))
    [watching] = daemon.wait_for("code.watching")
    assert str(tmp_path) in watching["directories"]
    first = broker.publish(topic, task="work")
    daemon.wait_for_ids("message.done", set(first))

    published: list[tuple[float, str]] = []
    stop = threading.Event()

    def publish_one() -> None:
        sent = time.monotonic()  # when the publish began: the message cannot reach the daemon before
        [mid] = broker.publish(topic, task="work")
        published.append((sent, mid))

    def publish_every_100ms() -> None:
        while not stop.is_set():
            publish_one()
            time.sleep(0.1)

    publisher = threading.Thread(target=publish_every_100ms)
    mark = daemon.mark()
    publisher.start()
    time.sleep(0.3)
    edited = time.monotonic()
    write_module(tmp_path, "v2")
    try:
        daemon.wait_for("code.ready", since=mark, timeout=10)
        ready_seen = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        publisher.join()
    publish_one()  # at least one message sent after code.ready, however slow the publishes were
    daemon.wait_for_ids("message.done", {mid for _, mid in published}, timeout=30)
    new = set(ledger.ids("done_v2"))
    ran = [(round(at - ready_seen, 2), "v2" if mid in new else "v1") for at, mid in published]
    assert all(mid in new for at, mid in published if at > ready_seen), f"sent after code.ready but ran the old code: {ran}"
    last_old = max((at for at, mid in published if mid not in new), default=edited)
    later = [(at, mid) for at, mid in published if at > last_old]  # every one of these ran the new code
    assert later and all(mid in new for _, mid in later)
    latency = later[0][0] - edited  # the first message published after the edit whose behaviour changed for good
    [changed] = daemon.select("code.changed", since=mark)
    assert changed["trigger"] == "watch" and changed["changed"] == [str(tmp_path / "codegen_tasks.py")]
    assert latency < 2.0, f"the edit took {latency:.2f} s to reach the next message"
    print(f"\nrun --reload: edit to new behaviour {latency:.2f} s")
