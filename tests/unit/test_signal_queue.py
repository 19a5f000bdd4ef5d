"""The signal queue under signals that arrive while the loop reads it (Python runs a handler
between any two bytecodes of the main thread, so in the middle of a read)."""

from __future__ import annotations

import signal
import threading
import time

from consumerd.supervisor.signals import SignalQueue


def test_reads_while_signals_arrive_neither_fail_nor_lose_one():
    queue = SignalQueue()
    sent = recorded = 0

    def record(signum: int, frame: object) -> None:
        nonlocal recorded
        recorded += 1  # signals sent close together arrive as one: count what the handler saw
        queue.record(signum, frame)

    previous = signal.signal(signal.SIGTTIN, record)  # SIGTTIN: harmless to this process, handled by the daemon
    stop = threading.Event()

    def send() -> None:
        nonlocal sent
        while not stop.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTTIN)
            sent += 1
            time.sleep(0.0001)

    popped: list[str] = []
    sender = threading.Thread(target=send)
    try:
        sender.start()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert not queue.stop_requested()  # read while a handler may append
            popped += queue.pop_all()
        stop.set()
        sender.join()
        time.sleep(0.05)  # the last signal's handler runs at the main thread's next bytecode
        popped += queue.pop_all()
    finally:
        stop.set()
        signal.signal(signal.SIGTTIN, previous)
    assert sent > 100 and recorded > 100
    assert popped == ["ttin"] * recorded  # none lost between reading the queue and clearing it


def test_a_stop_signal_is_seen_until_the_loop_takes_it():
    queue = SignalQueue()
    queue.record(signal.SIGHUP)
    assert not queue.stop_requested()
    queue.record(signal.SIGTERM)
    assert queue.stop_requested()
    assert queue.pop_all() == ["hup", "term"]
    assert not queue.stop_requested() and queue.pop_all() == []
