"""Fixtures for tests that run the real daemon against the real Pub/Sub emulator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from consumerd.testing.emulator import Emulator
from harness.daemon import Daemon, daemon_env
from tests.support.pubsub import toml


@pytest.fixture(scope="session")
def pubsub_emulator(emulator: Emulator) -> Emulator:
    """consumerd's pytest plugin (its own fixtures) on the emulator these tests already run."""
    return emulator


@pytest.fixture
def make_daemon(emulator: Emulator, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start the real daemon on a subscription with config overrides; stopped at teardown."""
    started: list[Daemon] = []

    def make(
        subscription: str,
        host: str | None = None,
        env: dict[str, str] | None = None,
        run_args: tuple[str, ...] = (),
        **sections: dict[str, Any],
    ) -> Daemon:
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
        daemon = Daemon(config, daemon_env(host or emulator.host, tmp_path, **(env or {})), run_args=run_args).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()
