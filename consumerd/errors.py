"""Exception hierarchy and the daemon's named exit codes."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes, chosen from sysexits(3) so systemd units can act on them.

    CONFIG is listed in the unit's RestartPreventExitStatus: a broken config must not restart-loop.
    """

    OK = 0
    FAILURE = 1
    USAGE = 64  # EX_USAGE: bad command line
    UNAVAILABLE = 69  # EX_UNAVAILABLE: Pub/Sub unreachable at start-up
    SOFTWARE = 70  # EX_SOFTWARE: an internal error we did not expect
    CONFIG = 78  # EX_CONFIG: invalid configuration, task modules or subscription


class ConsumerdError(Exception):
    """Base of every error consumerd raises on purpose; carries the exit code it maps to."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(ConsumerdError):
    """Anything the operator must fix in the configuration; one line, no traceback."""

    exit_code = ExitCode.CONFIG


class RegistryError(ConfigError):
    """Task registry problems (duplicate name, import failure): configuration errors too."""


class PubSubUnavailable(ConsumerdError):
    """Pub/Sub could not be reached within the start-up retry budget."""

    exit_code = ExitCode.UNAVAILABLE


class WorkerProtocolError(ConsumerdError):
    """A worker sent something that is not a valid frame: the worker is treated as crashed."""
