"""Issue 9: nothing a task, a message or a limit does can take the supervisor down (real daemon, real emulator)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from consumerd.supervisor.descriptors import BASE_FDS
from harness.daemon import REPO, Daemon, daemon_env, with_nofile
from harness.procinfo import alive, process_table
from tests.support.pubsub import toml

pytestmark = pytest.mark.integration
FAST_RETRY = {"min_backoff": 0, "max_backoff": 0}


@pytest.mark.parametrize("after", ["nan", "inf", "-1"])
def test_retry_with_nan_inf_or_negative_delay_is_a_failure_not_a_crash(broker, topic_sub, make_daemon, ledger, after):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="retry_bad_delay", after=after)
    daemon = make_daemon(sub, retry=FAST_RETRY)
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    assert failed["outcome"] == "error" and "finite number >= 0" in failed["error"]
    daemon.wait_for("message.done", message_id=mid)
    assert daemon.process.poll() is None and ledger.ids("done") == [mid]


def test_a_task_writing_a_pickle_frame_to_its_channel_runs_no_code_in_the_supervisor(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="pickle_bomb_once")
    daemon = make_daemon(sub, retry=FAST_RETRY)
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    assert failed["outcome"] == "crash" and "protocol error" in failed["error"]
    daemon.wait_for("message.done", message_id=mid)
    assert not (tmp_path / "pwned").exists()
    assert daemon.process.poll() is None


def test_a_5_mb_exception_message_reaches_the_supervisor_cut_to_4_kib(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="huge_error_once")
    daemon = make_daemon(sub, retry=FAST_RETRY)
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    assert failed["outcome"] == "error" and len(failed["error"]) == 4096
    daemon.wait_for("message.done", message_id=mid)


def _run(tmp_path: Path, emulator_host: str, settings: dict, *args: str, nofile: int | None = None) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "c.toml"
    config.write_text(toml(settings))
    command = [sys.executable, "-m", "consumerd", *args, "--config", str(config)]
    return subprocess.run(
        with_nofile(command, nofile) if nofile else command,
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(emulator_host, tmp_path),
        cwd=REPO,
    )


def test_concurrency_above_the_descriptor_limit_is_refused_with_exit_78(tmp_path, emulator, topic_sub):
    _, sub = topic_sub()
    settings = {"pubsub": {"subscription": sub}, "workers": {"concurrency": 80}, "tasks": {"modules": ["tests.support.tasks"]}}
    for command in ("run", "check-config"):
        result = _run(tmp_path, emulator.host, settings, command, nofile=BASE_FDS + 2 * 79)  # one worker short
        assert result.returncode == 78, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert "workers.concurrency = 80" in line and "LimitNOFILE" in line and "Traceback" not in result.stderr


def test_check_config_imports_the_task_modules_and_checks_the_default_task(tmp_path, emulator):
    base = {"pubsub": {"subscription": "jobs"}}
    missing = _run(tmp_path, emulator.host, {**base, "tasks": {"modules": ["tests.support.no_such_module"]}}, "check-config")
    assert missing.returncode == 78 and "cannot import 'tests.support.no_such_module'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    default = _run(tmp_path, emulator.host, {**base, "tasks": {"modules": ["tests.support.tasks"], "default": "nope"}}, "check-config")
    assert default.returncode == 78 and "tasks.default: no task named 'nope'" in default.stderr


def _config(tmp_path: Path, sub: str, concurrency: int) -> Path:
    config = tmp_path / "c.toml"
    settings = {"pubsub": {"subscription": sub}, "workers": {"concurrency": concurrency}}
    config.write_text(toml({**settings, "tasks": {"modules": ["tests.support.tasks"]}, "logging": {"format": "json"}}))
    return config


def test_a_sigttin_storm_stops_at_the_descriptor_ceiling(broker, topic_sub, emulator, tmp_path):
    _, sub = topic_sub()
    config = _config(tmp_path, sub, concurrency=2)
    nofile = BASE_FDS + 2 * 10  # room for 10 workers
    daemon = Daemon(config, daemon_env(emulator.host, tmp_path), nofile=nofile).start()
    try:
        daemon.wait_for("daemon.ready")
        handled = 0
        for _ in range(30):  # one at a time: the kernel merges a pending SIGTTIN with the next
            daemon.signal(signal.SIGTTIN)
            handled += 1
            deadline = time.monotonic() + 30
            while len(daemon.select("workers.resized")) + len(daemon.select("workers.resize_refused")) < handled:
                assert time.monotonic() < deadline, "SIGTTIN not handled"
                time.sleep(0.01)
        resized = daemon.select("workers.resized")
        assert [e["concurrency"] for e in resized] == list(range(3, 11))
        assert len(daemon.select("workers.resize_refused")) == 30 - 8
        assert daemon.process.poll() is None
    finally:
        daemon.stop()


def test_a_setsid_grandchild_is_killed_within_a_second_and_none_outlive_run(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [quick] = broker.publish(topic, task="escape_setsid")
    daemon = make_daemon(sub)
    daemon.wait_for("message.done", message_id=quick)
    grandchild, exited_at = _escaped(ledger, quick)
    deadline = exited_at + 1.0
    while alive(grandchild) and time.time() < deadline + 2:
        time.sleep(0.02)
    assert not alive(grandchild), "the escaped grandchild is still running"
    assert time.time() <= deadline + 0.3  # gone within a second of its parent's exit (small poll slack)
    # One that escapes while its task is still running, then the daemon stops.
    [lingering] = broker.publish(topic, task="escape_setsid", linger="30")
    daemon.wait_for("message.done", message_id=quick)
    while not [p for p in ledger.lines() if p[0].startswith("parent_exited=") and p[1] == lingering]:
        time.sleep(0.05)
    second, _ = _escaped(ledger, lingering)
    daemon.signal(signal.SIGINT)
    daemon.wait_for("drain.started")
    daemon.signal(signal.SIGINT)  # a second one: stop now (two at once would merge into one)
    daemon.wait_exit(60)
    assert not alive(second)
    assert not [pid for pid, (parent, _) in process_table().items() if parent == daemon.pid]


def _escaped(ledger, message_id: str) -> tuple[int, float]:
    lines = [p for p in ledger.lines() if p[1] == message_id]
    grandchild = next(int(p[0].split("=")[1]) for p in lines if p[0].startswith("grandchild="))
    exited_at = next(float(p[0].split("=")[1]) for p in lines if p[0].startswith("parent_exited="))
    return grandchild, exited_at


def test_workers_hold_no_fork_server_descriptors(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="fd_probe")
    make_daemon(sub).wait_for("message.done", message_id=mid)
    [probe] = [p[0] for p in ledger.lines() if p[0].startswith("fds=")]
    fds = dict(item.split(":", 1) for item in probe[4:].split(","))
    extra = {fd: target for fd, target in fds.items() if int(fd) > 2}
    # Only its channel to the supervisor (a socket) and the descriptor listing /proc/self/fd itself.
    assert sum(1 for target in extra.values() if target.startswith("socket:")) == 1, fds
    assert not [t for t in extra.values() if t.startswith(("pipe:", "anon_inode:"))], fds


def test_a_consumerd_directory_in_the_working_directory_cannot_replace_the_fork_server(broker, topic_sub, emulator, tmp_path, ledger):
    topic, sub = topic_sub()
    fake = tmp_path / "cwd" / "consumerd"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"open({str(tmp_path / 'hijacked')!r}, 'w').write('x')\n")
    (fake / "forkserver.py").write_text("")
    config = _config(tmp_path, sub, concurrency=1)
    [mid] = broker.publish(topic, task="ok")
    console_script = Path(sys.executable).with_name("consumerd")  # sys.path[0] is the venv's bin, not the cwd
    daemon = Daemon(config, daemon_env(emulator.host, tmp_path), command=[str(console_script)], cwd=fake.parent).start()
    try:
        daemon.wait_for("message.done", message_id=mid)
    finally:
        daemon.stop()
    assert not (tmp_path / "hijacked").exists()


def _status(socket_path: Path) -> dict:
    from consumerd.control.client import request

    return request(str(socket_path), "status")


def test_a_frozen_supervisor_drops_lapsed_messages_instead_of_running_them(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub(ack_deadline=10)
    ids = broker.publish(topic, 400, data={"seconds": 0.05}, task="sleep")
    socket_path = tmp_path / "first.sock"
    first = make_daemon(sub, workers={"concurrency": 2}, control={"socket": str(socket_path)})
    first.wait_for("message.done", count=20, timeout=60)
    deadline = time.monotonic() + 20
    while _status(socket_path)["queued"] < 1:  # freeze it while messages wait in its queue
        assert time.monotonic() < deadline, "nothing ever queued"
    os.kill(first.pid, signal.SIGSTOP)  # their leases run out while it is frozen
    try:
        second = make_daemon(sub, workers={"concurrency": 4})
        deadline = time.monotonic() + 120
        while set(ledger.ids("done")) < set(ids):  # the second daemon finishes everything, the frozen one's too
            assert time.monotonic() < deadline, "second daemon did not finish the backlog"
            time.sleep(0.2)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.wait_for("lease.lapsed", timeout=30)
    [listening] = first.wait_for("metrics.listening")
    metrics = urllib.request.urlopen(f"http://{listening['address']}/metrics", timeout=5).read().decode()
    counted = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("consumerd_lease_lapsed_total ")))
    first.stop(), second.stop()
    lapsed = first.select("lease.lapsed")
    starts = [p[1] for p in ledger.lines() if p[0] == "start"]
    for event in lapsed:
        assert starts.count(event["message_id"]) == 1, f"{event['message_id']} ran again after its lease lapsed"
    [stopped] = first.select("daemon.stopped")
    assert stopped["lease_lapsed"] == len(lapsed) and 1 <= counted <= len(lapsed)


def test_task_code_sees_none_of_the_daemons_secrets_or_channels(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="snoop")
    secrets = {"CREDENTIALS_DIRECTORY": "/run/credentials/consumerd.service", "GOOGLE_APPLICATION_CREDENTIALS": "/etc/consumerd/key.json"}
    daemon = make_daemon(sub, env=secrets)
    daemon.wait_for("message.done", message_id=mid)
    seen = {event for event, *_ in ledger.lines() if event.startswith("env:")}
    for name in ("CREDENTIALS_DIRECTORY", "GOOGLE_APPLICATION_CREDENTIALS", "CONSUMERD_METRICS__LISTEN"):
        assert f"env:{name}:absent" in seen  # the daemon had each of them
