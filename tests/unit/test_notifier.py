"""The notifier against real AF_UNIX datagram sockets standing in for systemd."""

import os
import socket

import pytest

from consumerd.adapters.systemd import Notifier
from harness.daemon import NotifySocket


@pytest.fixture
def notify_env(monkeypatch):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_notify_socket_everything_is_a_no_op(notify_env):
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("x")
    notifier.ping_watchdog(0.0)
    assert notifier.sent == 0 and notifier.watchdog_due(0.0) is None


def test_ready_status_and_stopping_reach_the_socket(notify_env):
    sock = NotifySocket()
    notify_env.setenv("NOTIFY_SOCKET", sock.path)
    notifier = Notifier()
    notifier.ready("running: 0")
    notifier.status("running: 5")
    notifier.stopping("draining")
    got = sock.wait_for(lambda m: len(m) >= 3, timeout=5)
    assert got[0].splitlines() == ["READY=1", "STATUS=running: 0", f"MAINPID={os.getpid()}"]
    assert got[1] == "STATUS=running: 5"
    assert got[2].splitlines()[0] == "STOPPING=1"
    sock.close()


def test_abstract_socket_addresses_work(notify_env):
    name = f"consumerd-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    notify_env.setenv("NOTIFY_SOCKET", "@" + name)
    Notifier().notify("READY=1")
    assert server.recv(100) == b"READY=1"
    server.close()


def test_watchdog_pings_at_half_the_interval_only_when_due(notify_env):
    sock = NotifySocket()
    notify_env.setenv("NOTIFY_SOCKET", sock.path)
    notify_env.setenv("WATCHDOG_USEC", "4000000")
    notifier = Notifier()
    assert notifier.watchdog_interval == 2.0
    for now in (100.0, 100.5, 101.9, 102.0, 103.0):
        notifier.ping_watchdog(now)
    assert notifier.sent == 2  # at 100.0 and 102.0
    assert notifier.watchdog_due(103.0) == 104.0
    sock.close()


def test_watchdog_for_another_pid_is_ignored(notify_env):
    notify_env.setenv("WATCHDOG_USEC", "4000000")
    notify_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier().watchdog_interval is None


def test_a_reader_that_stops_reading_never_blocks_the_sender(notify_env):
    sock = NotifySocket(read=False)  # bound, never read: its queue fills up
    notify_env.setenv("NOTIFY_SOCKET", sock.path)
    notifier = Notifier()
    for _ in range(5000):  # far beyond the datagram queue; a blocking send would hang here
        notifier.status("x" * 200)
    assert notifier.dropped > 0 and notifier.sent + notifier.dropped == 5000
    sock.close()


def test_a_reader_that_disappears_is_counted_not_raised(notify_env):
    sock = NotifySocket(read=False)
    notify_env.setenv("NOTIFY_SOCKET", sock.path)
    notifier = Notifier()
    sock.close()
    os.unlink(sock.path)
    notifier.status("anyone?")
    assert notifier.dropped == 1
