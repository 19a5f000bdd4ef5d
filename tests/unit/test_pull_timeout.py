"""The long poll's length is pubsub.pull_timeout: the Puller gets it from the settings, it has no default of its own."""

from __future__ import annotations

import inspect
import threading

import pytest

from consumerd.adapters.pubsub import puller
from consumerd.config import load_settings
from consumerd.ipc.inbox import Inbox
from consumerd.supervisor.components import Components


class _PubSub:
    """Only what `Components.io_threads` binds; nothing is called."""

    def pull(self, n: int, timeout: float) -> list:
        raise AssertionError("not called")

    ack = modack = publish = pull


def test_the_puller_has_no_timeout_of_its_own():
    assert not hasattr(puller, "PULL_TIMEOUT")
    assert inspect.signature(puller.Puller).parameters["timeout"].default is inspect.Parameter.empty


@pytest.mark.parametrize(("text", "expected"), [("", 30.0), ("pull_timeout = 4\n", 4.0)])
def test_components_build_the_puller_with_the_configured_pull_timeout(tmp_path, monkeypatch, text, expected):
    monkeypatch.delenv("CONSUMERD_PUBSUB__PULL_TIMEOUT", raising=False)
    path = tmp_path / "c.toml"
    path.write_text(f'[pubsub]\nproject = "p"\nsubscription = "jobs"\nemulator_host = "127.0.0.1:1"\n{text}')
    settings = load_settings(path)
    inbox = Inbox()
    threads = Components().io_threads(_PubSub(), settings, inbox)  # type: ignore[arg-type]
    assert threads.puller._timeout == settings.pubsub.pull_timeout == expected


def test_each_pull_asks_for_the_configured_timeout():
    asked: list[float] = []
    done = threading.Event()

    def pull(n: int, timeout: float) -> list:
        asked.append(timeout)
        done.set()
        return []

    p = puller.Puller(pull, Inbox(), lambda exc: False, 7.5)
    p.start()
    p.request(1)
    assert done.wait(5)
    p.stop()
    assert asked == [7.5]
