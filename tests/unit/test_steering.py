"""The control commands against a small fake of `Steerable`: no Supervisor, no socket."""

import selectors
from typing import Any

import structlog

from consumerd.control.commands import Steering
from consumerd.control.server import Command, Request


class Daemon:
    max_concurrency = 4

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def status(self) -> dict[str, Any]:
        return {"state": "running"}

    def set_paused(self, paused: bool, subscription: str = "") -> None:
        if subscription not in ("", "orders"):
            raise LookupError(f"no subscription {subscription!r} here (serving: orders)")
        self.calls.append(("paused", paused, subscription))

    def drain(self, subscription: str = "") -> None:
        self.calls.append(("drain", subscription))

    def resize(self, concurrency: int) -> None:
        self.calls.append(("resize", concurrency))


def steering(daemon: Daemon) -> Steering:
    return Steering(daemon, selectors.DefaultSelector(), lambda: 0.0, lambda _s: None, structlog.get_logger("test"))


def run(s: Steering, command: Command, **args: Any) -> dict[str, Any]:
    return s.run(Request(command, args, uid=0))


def test_each_command_asks_the_daemon_for_exactly_its_effect():
    daemon = Daemon()
    s = steering(daemon)
    assert run(s, Command.STATUS) == {"ok": True, "state": "running"}
    assert run(s, Command.PAUSE) == {"ok": True, "paused": True}
    assert run(s, Command.RESUME) == {"ok": True, "paused": False}
    assert run(s, Command.SCALE, n=3) == {"ok": True, "concurrency": 3}
    assert run(s, Command.DRAIN) == {"ok": True, "state": "draining"}
    assert daemon.calls == [("paused", True, ""), ("paused", False, ""), ("resize", 3), ("drain", "")]


def test_pause_resume_and_drain_take_one_subscription_and_refuse_an_unknown_one():
    daemon = Daemon()
    s = steering(daemon)
    assert run(s, Command.PAUSE, subscription="orders") == {"ok": True, "paused": True, "subscription": "orders"}
    assert run(s, Command.DRAIN, subscription="orders") == {"ok": True, "state": "draining", "subscription": "orders"}
    assert run(s, Command.RESUME, subscription="emails") == {"ok": False, "error": "no subscription 'emails' here (serving: orders)"}
    for bad in (3, ["orders"], "x" * 301):
        assert run(s, Command.PAUSE, subscription=bad)["ok"] is False
    assert daemon.calls == [("paused", True, "orders"), ("drain", "orders")]


def test_scale_refuses_what_is_not_a_whole_number_within_the_limit():
    daemon = Daemon()
    s = steering(daemon)
    for bad in (0, 5, -1, True, 2.0, "3", None):
        answer = run(s, Command.SCALE, n=bad)
        assert answer["ok"] is False and "from 1 to 4" in answer["error"], bad
    assert daemon.calls == []


def test_without_a_socket_path_nothing_listens():
    import contextlib

    s = steering(Daemon())
    with contextlib.ExitStack() as resources:
        s.listen("", "", resources)
    assert s.server is None
    s.drop_stale(10.0)  # no server: nothing to drop, no error
