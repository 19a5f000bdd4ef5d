"""Signals as events: handlers only record the signal number; the loop reads them and dispatches.

`signal.set_wakeup_fd` writes a byte to a pipe the loop's selector watches, so a signal wakes the
loop at once without any work in the handler itself (no logging, no I/O, no raising there).
"""

from __future__ import annotations

import collections
import os
import selectors
import signal

from consumerd.ipc.inbox import drain_fd

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
STOP = frozenset({signal.SIGTERM, signal.SIGINT})


class SignalQueue:
    def __init__(self) -> None:
        self._pending: collections.deque[int] = collections.deque()

    def install(self, selector: selectors.BaseSelector) -> None:
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        selector.register(wake_r, selectors.EVENT_READ, lambda: drain_fd(wake_r))
        for signum in HANDLED:
            signal.signal(signum, self.record)

    def record(self, signum: int, _frame: object = None) -> None:
        self._pending.append(signum)  # only record: the loop handles it

    # A handler runs between any two bytecodes of the main thread, so in the middle of a read of
    # the queue too: the reads below make no Python-level pass over it (a C-level copy, popleft).
    def stop_requested(self) -> bool:
        return not STOP.isdisjoint(tuple(self._pending))

    def pop_all(self) -> list[str]:
        """Pending signals, oldest first, as handler suffixes: "term", "hup", "ttin"... One that
        arrives meanwhile is taken now or stays for the next call, never dropped."""
        names = []
        while self._pending:
            names.append(signal.Signals(self._pending.popleft()).name[3:].lower())
        return names
