"""Steering a running daemon through its control socket: status, pause, resume, drain, scale.

The socket's mechanics are `ControlServer`'s; this is what each command does to the supervisor.
A command changes only what a signal or a reload could change too (drain is SIGTERM, scale is what
SIGTTIN/SIGTTOU do), always on the loop's thread.
"""

from __future__ import annotations

import contextlib
import selectors
import signal
from typing import TYPE_CHECKING, Any

from consumerd.control.server import Client, ControlServer

if TYPE_CHECKING:
    from consumerd.supervisor.loop import Supervisor


class Steering:
    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor

    def listen(self, path: str, group: str, resources: contextlib.ExitStack) -> ControlServer | None:
        """The control socket at ``path`` ("" = none), served from the supervisor's selector."""
        if not path:
            return None
        server = ControlServer(path, group, forget=self.sup.forget_fd)
        resources.callback(server.close)
        self.sup.selector.register(server, selectors.EVENT_READ, self.accept)
        self.sup.log.info("control.listening", socket=path)
        return server

    def accept(self) -> None:
        assert self.sup.control is not None
        if client := self.sup.control.accept(self.sup.clock()):
            self.sup.selector.register(client, selectors.EVENT_READ, lambda: self.on_client(client))

    def on_client(self, client: Client) -> None:
        assert self.sup.control is not None
        if request := self.sup.control.read(client):
            self.sup.control.reply(client, getattr(self, f"control_{request.command}")(request.args))

    def drop_stale(self, now: float) -> None:
        for client in self.sup.control.stale(now) if self.sup.control else ():
            self.sup.control.drop(client)  # type: ignore[union-attr]

    def control_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **self.sup.reporter.status(self.sup.clock(), self.sup.state.value, self.sup.concurrency, self.sup.paused)}

    def control_pause(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.sup.paused = True
        self.sup.log.info("daemon.paused", running=self.sup.pool.busy_count(), queued=len(self.sup.backlog))
        return {"ok": True, "paused": True}

    def control_resume(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.sup.paused = False
        self.sup.log.info("daemon.resumed")
        return {"ok": True, "paused": False}

    def control_drain(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.sup.signals.record(signal.SIGTERM)  # exactly what SIGTERM does, on the next tick
        return {"ok": True, "state": "draining"}

    def control_scale(self, args: dict[str, Any]) -> dict[str, Any]:
        n = args.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.sup.max_concurrency:
            return {"ok": False, "error": f"scale needs a whole number of workers from 1 to {self.sup.max_concurrency}"}
        self.sup.resize(n)
        self.sup.log.info("workers.resized", concurrency=n, via="control socket")
        return {"ok": True, "concurrency": n}
