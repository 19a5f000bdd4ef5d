"""Faults and bad inputs, each a named test with its expected outcome (real daemon, real emulator)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from consumerd.testing.emulator import free_port
from harness.daemon import REPO, NotifySocket, daemon_env
from harness.procinfo import alive, descendants, status_kb

pytestmark = pytest.mark.integration


# -- messages ----------------------------------------------------------------------------------


def test_empty_and_10mb_and_odd_attribute_messages_are_processed(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    empty = broker.publish(topic, data=b"", task="ok")[0]
    big = broker.publish(topic, data=os.urandom(9_500_000), task="ok")[0]
    odd = broker.publish(topic, data=b"x", task="ok", **{"k=v": "a\nb", "ünï": "çødé ✓", "empty": ""})[0]
    daemon = make_daemon(sub, workers={"concurrency": 2})
    done = daemon.wait_for_ids("message.done", {empty, big, odd}, timeout=60)
    assert {e["message_id"]: e["size"] for e in done}[big] == 9_500_000
    assert sorted(ledger.ids("done")) == sorted([empty, big, odd])


def test_task_that_allocates_until_memory_runs_out_fails_and_is_retried(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="memory_bomb_once")
    daemon = make_daemon(sub, retry={"min_backoff": 0, "max_backoff": 0})
    [failed] = daemon.wait_for("message.failed", message_id=mid, timeout=60)
    assert "MemoryError" in failed["error"]
    daemon.wait_for("message.done", message_id=mid, timeout=60)
    assert daemon.process.poll() is None


def test_payloads_are_never_logged(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    secret = "SECRET-PAYLOAD-7f3a9c"
    ids = [broker.publish(topic, data=secret.encode(), task=t)[0] for t in ("ok", "raise_once", "no_such_task")]
    daemon = make_daemon(sub, retry={"min_backoff": 0, "max_backoff": 1}, logging={"level": "debug"})
    daemon.wait_for_ids("message.done", set(ids[:2]), timeout=30)
    daemon.wait_for("message.failed", message_id=ids[2])
    daemon.stop()
    assert secret not in "".join(daemon.raw) + daemon.stderr


# -- processes ---------------------------------------------------------------------------------


def test_garbage_on_the_result_channel_kills_the_worker_and_retries(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="garbage_once")
    daemon = make_daemon(sub, retry={"min_backoff": 0, "max_backoff": 0})
    [failed] = daemon.wait_for("message.failed", message_id=mid, timeout=30)
    assert failed["outcome"] == "crash" and "protocol error" in failed["error"]
    daemon.wait_for("message.done", message_id=mid, timeout=30)
    assert ledger.ids("done") == [mid]


def test_task_ignoring_sigterm_is_killed_after_the_grace_period(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="ignore_term_once")
    daemon = make_daemon(sub, workers={"task_timeout": 1}, retry={"min_backoff": 0, "max_backoff": 0})
    [failed] = daemon.wait_for("message.failed", message_id=mid, timeout=30)
    assert failed["outcome"] == "timeout" and failed["duration_ms"] >= 5_000  # TERM ignored: KILL 5 s later
    [exited] = daemon.wait_for("worker.exited", reason="timeout after 1s")
    daemon.wait_for("message.done", message_id=mid, timeout=30)


def test_task_closing_stdout_and_stderr_does_not_hurt(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    ids = broker.publish(topic, 3, task="close_stdio") + broker.publish(topic, 3, task="raise_once")
    daemon = make_daemon(sub, workers={"concurrency": 1}, retry={"min_backoff": 0, "max_backoff": 0})
    daemon.wait_for_ids("message.done", set(ids), timeout=60)
    assert daemon.process.poll() is None


def test_children_a_task_leaves_behind_are_killed_and_reaped(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="leave_child")
    daemon = make_daemon(sub)
    daemon.wait_for("message.done", message_id=mid)
    child = int(next(e for e, *_ in ledger.lines() if e.startswith("child=")).split("=")[1])
    assert not alive(child)
    assert daemon.select("task.left_children", message_id=mid)
    assert all(state != "Z" for _, state in descendants(daemon.pid)), "no zombies"


def test_1000_crashing_tasks_leak_no_fds_zombies_or_memory(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    daemon = make_daemon(sub, workers={"concurrency": 4}, retry={"min_backoff": 0, "max_backoff": 0})
    daemon.wait_for("daemon.ready")
    warmup = broker.publish(topic, 20, task="exit_once")
    daemon.wait_for_ids("message.done", set(warmup), timeout=60)
    fds_before = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    rss_before = status_kb(daemon.pid, "VmRSS")
    ids = broker.publish(topic, 1000, task="exit_once")
    daemon.wait_for_ids("message.done", set(ids), timeout=240)
    assert len(daemon.select("message.failed", outcome="crash")) >= 1000
    fds_after = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    rss_after = status_kb(daemon.pid, "VmRSS")
    zombies = [pid for pid, state in descendants(daemon.pid) if state == "Z"]
    print(f"1000 crashes: fds {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} kB, zombies {len(zombies)}")
    assert fds_after <= fds_before + 2
    assert not zombies
    assert rss_after - rss_before < 20_000, "supervisor RSS grew by more than 20 MB"


# -- Pub/Sub and signals -----------------------------------------------------------------------


def _run_against(tmp_path, host, extra_toml="", timeout=60, send=None):
    config = tmp_path / "c.toml"
    config.write_text(
        f'[pubsub]\nsubscription = "jobs"\n{extra_toml}[tasks]\nmodules = ["tests.support.tasks"]\n[logging]\nformat = "json"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumerd", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=daemon_env(host, tmp_path),
        cwd=REPO,
    )
    if send:
        send(proc)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_unreachable_pubsub_at_start_up_retries_then_exits_69(tmp_path):
    nobody = f"127.0.0.1:{free_port()}"
    code, out, err = _run_against(tmp_path, nobody, "startup_timeout = 3\n")
    assert code == 69
    assert '"pubsub.unreachable"' in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Pub/Sub unreachable" in lines[0] and "startup_timeout" in lines[0]


def test_sigterm_during_start_up_exits_0_promptly(tmp_path):
    nobody = f"127.0.0.1:{free_port()}"

    def term_while_retrying(proc):
        for line in proc.stdout:
            if '"pubsub.unreachable"' in line:
                proc.send_signal(signal.SIGTERM)
                return

    started = time.monotonic()
    code, _, err = _run_against(tmp_path, nobody, "startup_timeout = 120\n", send=term_while_retrying)
    assert code == 0, err
    assert time.monotonic() - started < 30


def test_sighup_storm_and_sigterm_during_reload(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    ids = broker.publish(topic, 40, data={"seconds": 0.05}, task="sleep")
    daemon = make_daemon(sub, workers={"concurrency": 4})
    daemon.wait_for("daemon.ready")
    for _ in range(30):
        daemon.signal(signal.SIGHUP)
    daemon.wait_for_ids("message.done", set(ids), timeout=60)
    assert daemon.wait_for("reload.done") and daemon.process.poll() is None
    daemon.signal(signal.SIGHUP)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0


def test_reload_with_an_invalid_config_keeps_the_old_one(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    daemon = make_daemon(sub)
    daemon.wait_for("daemon.ready")
    daemon.config.write_text(daemon.config.read_text().replace("concurrency = 2", "concurrency = -1"))
    daemon.signal(signal.SIGHUP)
    [rejected] = daemon.wait_for("reload.rejected")
    assert "workers.concurrency" in rejected["error"]
    [mid] = broker.publish(topic, task="ok")
    daemon.wait_for("message.done", message_id=mid)


def test_notify_socket_nobody_reads_never_stalls_the_loop(broker, topic_sub, make_daemon, ledger):
    sock = NotifySocket(read=False)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        while True:  # fill the reader's queue before the daemon starts: every send would block
            filler.sendto(b"X" * 64, sock.path)
    except BlockingIOError:
        pass
    topic, sub = topic_sub()
    ids = broker.publish(topic, 300, task="ok")
    daemon = make_daemon(sub, env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "200000"})
    daemon.wait_for_ids("message.done", set(ids), timeout=120)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    [stopped] = daemon.select("daemon.stopped")
    assert stopped["notify_dropped"] > 0
    sock.close()
    filler.close()
