"""Fixtures for tests that run the real daemon against the real Pub/Sub emulator."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from consumerd.emulator import Emulator, EmulatorError, sdk_root
from tests.support.daemon import Daemon, NotifySocket, daemon_env
from tests.support.pubsub import Broker, Ledger, toml


def _emulator_available() -> str:
    try:
        root = sdk_root()
    except (EmulatorError, OSError) as exc:
        return str(exc)
    if not (root / "platform" / "pubsub-emulator").is_dir():
        return f"no pubsub emulator under {root} (apt-get install google-cloud-cli-pubsub-emulator)"
    if not shutil.which("java"):
        return "java not found (the emulator needs Java 17)"
    return ""


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    missing = _emulator_available()
    if missing:
        pytest.fail(f"the Pub/Sub emulator is required for integration tests: {missing}")
    with Emulator() as emu:
        yield emu


@pytest.fixture(scope="session")
def broker(emulator: Emulator) -> Iterator[Broker]:
    b = Broker(emulator.host)
    yield b
    b.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path)


@pytest.fixture
def make_daemon(emulator: Emulator, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start the real daemon on a subscription with config overrides; stopped at teardown."""
    started: list[Daemon] = []

    def make(subscription: str, host: str | None = None, env: dict[str, str] | None = None, **sections: dict[str, Any]) -> Daemon:
        settings: dict[str, dict[str, Any]] = {
            "pubsub": {"subscription": subscription},
            "workers": {"concurrency": 2, "task_timeout": 60},
            "leases": {"ack_deadline": 10},
            "shutdown": {"drain_timeout": 30},
            "tasks": {"modules": ["tests.support.tasks"]},
            "logging": {"format": "json", "level": "info"},
        }
        for section, values in sections.items():
            settings.setdefault(section, {}).update(values)
        config = tmp_path / f"consumerd-{len(started)}.toml"
        config.write_text(toml(settings))
        daemon = Daemon(config, daemon_env(host or emulator.host, tmp_path, **(env or {}))).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def topic_sub(broker: Broker) -> Iterator[Callable[..., tuple[str, str]]]:
    made: list[tuple[str, str]] = []

    def create(**kwargs: Any) -> tuple[str, str]:
        pair = broker.create(**kwargs)
        made.append(pair)
        return pair

    yield create
    for topic, sub in made:
        broker.delete(topic, sub)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()
