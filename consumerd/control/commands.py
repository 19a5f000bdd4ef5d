"""Steering a running daemon through its control socket: status, pause, resume, drain, scale.

The socket's mechanics are `ControlServer`'s; this is what each command does, against `Steerable`:
the few things the daemon lets a command do. A command changes only what a signal or a reload could
change too (drain is SIGTERM, scale is what SIGTTIN/SIGTTOU do), always on the loop's thread.
"""

from __future__ import annotations

import contextlib
import selectors
from collections.abc import Callable
from typing import Any, Protocol

from structlog.stdlib import BoundLogger

from consumerd.control.server import Client, Command, ControlServer, Request


class Steerable(Protocol):
    """What the commands may ask of the daemon: each is also reachable by a signal or a reload."""

    @property
    def max_concurrency(self) -> int: ...

    def status(self) -> dict[str, Any]: ...

    def set_paused(self, paused: bool, subscription: str = "") -> None:
        """Every subscription, or the one named; LookupError when none is."""

    def drain(self, subscription: str = "") -> None:
        """The daemon, or one subscription; LookupError when none is named so."""

    def resize(self, concurrency: int) -> None: ...


class Steering:
    """Serves the control socket from the loop's selector and runs each request's command."""

    def __init__(
        self,
        daemon: Steerable,
        selector: selectors.BaseSelector,
        clock: Callable[[], float],
        forget: Callable[[Any], None],
        log: BoundLogger,
    ) -> None:
        self.daemon = daemon
        self.selector = selector
        self.clock = clock
        self.forget = forget
        self.log = log
        self.server: ControlServer | None = None

    def listen(self, path: str, group: str, resources: contextlib.ExitStack) -> None:
        """The control socket at ``path`` ("" = none), served from the loop's selector."""
        if not path:
            return
        self.server = ControlServer(path, group, forget=self.forget)
        resources.callback(self.server.close)
        self.selector.register(self.server, selectors.EVENT_READ, self.accept)
        self.log.info("control.listening", socket=path)

    def accept(self) -> None:
        if self.server and (client := self.server.accept(self.clock())):
            self.selector.register(client, selectors.EVENT_READ, lambda: self.on_client(client))

    def on_client(self, client: Client) -> None:
        if self.server and (request := self.server.read(client)):
            self.server.reply(client, self.run(request))

    def drop_stale(self, now: float) -> None:
        if self.server:
            for client in self.server.stale(now):
                self.server.drop(client)

    def run(self, request: Request) -> dict[str, Any]:
        commands: dict[Command, Callable[[dict[str, Any]], dict[str, Any]]] = {
            Command.STATUS: self.control_status,
            Command.PAUSE: self.control_pause,
            Command.RESUME: self.control_resume,
            Command.DRAIN: self.control_drain,
            Command.SCALE: self.control_scale,
        }
        return commands[request.command](request.args)

    def control_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **self.daemon.status()}

    def control_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.for_subscription(args, lambda name: self.daemon.set_paused(True, name), {"paused": True})

    def control_resume(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.for_subscription(args, lambda name: self.daemon.set_paused(False, name), {"paused": False})

    def control_drain(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.for_subscription(args, self.daemon.drain, {"state": "draining"})

    @staticmethod
    def for_subscription(args: dict[str, Any], command: Callable[[str], None], answer: dict[str, Any]) -> dict[str, Any]:
        """Run ``command`` on the subscription ``args`` names ("" or none: all of them)."""
        name = args.get("subscription", "")
        if not isinstance(name, str) or len(name) > 300:
            return {"ok": False, "error": "subscription must be a subscription's name or path"}
        try:
            command(name)
        except LookupError as exc:
            return {"ok": False, "error": str(exc.args[0])}
        return {"ok": True, **answer, **({"subscription": name} if name else {})}

    def control_scale(self, args: dict[str, Any]) -> dict[str, Any]:
        n, most = args.get("n"), self.daemon.max_concurrency
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= most:
            return {"ok": False, "error": f"scale needs a whole number of workers from 1 to {most}"}
        self.daemon.resize(n)
        self.log.info("workers.resized", concurrency=n, via="control socket")
        return {"ok": True, "concurrency": n}
