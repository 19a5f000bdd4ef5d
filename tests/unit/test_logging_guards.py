"""Settings that must not hurt: debug logging keeps Google's loggers at info; a remote emulator is flagged."""

import io
import logging

import pytest

from consumerd.cli import warn_if_emulator_is_remote
from consumerd.logsetup import configure_logging
from tests.unit.fakes import Log


@pytest.mark.parametrize(
    ("level", "google_level", "expected"),
    [("debug", "info", logging.INFO), ("debug", "debug", logging.DEBUG), ("warning", "info", logging.WARNING)],
)
def test_google_loggers_stay_at_their_floor(level, google_level, expected):
    configure_logging("json", level, stream=io.StringIO(), google_level=google_level)
    for name in ("google", "grpc", "urllib3"):
        assert logging.getLogger(name).level == expected
    assert logging.getLogger().level == logging.getLevelName(level.upper())
    configure_logging("json", "info", stream=io.StringIO())


@pytest.mark.parametrize(
    ("host", "warned"),
    [("127.0.0.1:8085", False), ("localhost:1", False), ("[::1]:8085", False), ("10.0.0.5:8085", True), ("pubsub-emulator:8085", True)],
)
def test_a_non_loopback_emulator_host_is_a_warning(host, warned):
    log = Log()
    warn_if_emulator_is_remote(host, log)
    assert bool(log.events("pubsub.emulator_not_loopback")) is warned
