"""Fixtures shared by the integration and system tests: the real Pub/Sub emulator and helpers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Make `tests.support` importable from the daemon's workers as well (they get PYTHONPATH).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from consumerd.testing.emulator import Emulator, unavailable  # noqa: E402
from harness.daemon import NotifySocket  # noqa: E402
from harness.tlsproxy import ProductionPath  # noqa: E402
from tests.support.pubsub import Broker, Ledger  # noqa: E402


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    missing = unavailable()
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


# google-auth refreshes a token 225 s before it expires: one living 227 s is fresh for 2 s, so a
# 6-second run goes through several refreshes.
TOKEN_LIFETIME = 227


@pytest.fixture
def production(emulator: Emulator, tmp_path: Path) -> Iterator[ProductionPath]:
    """The emulator behind TLS with a checking proxy, a CA, a service-account key and a token endpoint."""
    path = ProductionPath(tmp_path / "tls", emulator.host, token_lifetime=TOKEN_LIFETIME)
    yield path
    path.close()
