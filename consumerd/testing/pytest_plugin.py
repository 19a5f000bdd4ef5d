"""The pytest plugin (entry point `pytest11`, installed with consumerd): fixtures for end-to-end tests
of a project's tasks on the real daemon and the real Pub/Sub emulator.

- `pubsub_emulator`: the emulator on a free loopback port, once per session (skipped, with the
  reason, where it is not installed).
- `consumerd_daemon`: a factory: ``consumerd_daemon(modules=None, **sections)`` starts
  ``python -m consumerd run`` on the task modules (default: the ``consumerd_modules`` ini option)
  with these config sections overriding the defaults, consuming a fresh subscription, and returns
  a `LiveDaemon` once it is ready (``publish``, ``wait_for``, ``status``). Drained at teardown.
- `dead_letters`: what reached that test's dead-letter topic (``wait_for(message_id)``, ``pull()``).

Loading it costs nothing: the Pub/Sub client is imported by the fixtures when a test uses them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from consumerd.testing.emulator import Emulator
    from consumerd.testing.live import DeadLetters, LiveDaemon, Topics


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("consumerd_modules", "task modules the consumerd_daemon fixture loads", type="linelist", default=[])


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[Emulator]:
    from consumerd.testing.emulator import Emulator, unavailable

    missing = unavailable()
    if missing:
        pytest.skip(f"the Pub/Sub emulator is not available: {missing}")
    with Emulator() as emulator:
        yield emulator


@pytest.fixture
def consumerd_topics(pubsub_emulator: Emulator) -> Iterator[Topics]:
    """A topic and subscription for this test, and its dead-letter topic with a subscription."""
    from consumerd.testing.live import Topics

    topics = Topics(pubsub_emulator.host)
    yield topics
    topics.close()


@pytest.fixture
def consumerd_daemon(
    consumerd_topics: Topics, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[Callable[..., LiveDaemon]]:
    from consumerd.testing.live import LiveDaemon

    started: list[LiveDaemon] = []

    def start(modules: list[str] | None = None, **sections: dict[str, Any]) -> LiveDaemon:
        chosen = list(modules if modules is not None else pytestconfig.getini("consumerd_modules"))
        if not chosen:
            raise pytest.UsageError("consumerd_daemon: name the task modules (modules=[...] or the consumerd_modules ini option)")
        daemon = LiveDaemon(consumerd_topics, chosen, tmp_path_factory.mktemp("consumerd"), sections)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def dead_letters(consumerd_topics: Topics) -> DeadLetters:
    from consumerd.testing.live import DeadLetters

    return DeadLetters(consumerd_topics)
