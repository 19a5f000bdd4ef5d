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
    DATAERR = 65  # EX_DATAERR: `publish --task` with a payload that task's type refuses
    UNAVAILABLE = 69  # EX_UNAVAILABLE: Pub/Sub unreachable at start-up
    SOFTWARE = 70  # EX_SOFTWARE: an internal error we did not expect
    PROTOCOL = 76  # EX_PROTOCOL: a worker received something that is not a job
    CONFIG = 78  # EX_CONFIG: invalid configuration, task modules or subscription
    TERMINATED = 143  # a worker whose task was ended by SIGTERM (TaskCancelled), as a shell reports it


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


class Retry(Exception):
    """Raised by a task: run this message again after ``after`` seconds (at most 600).

    The daemon sets the message's lease to the delay instead of nacking it, so Pub/Sub hands it
    out again (to this host or another) once the delay has passed.
    """

    def __init__(self, after: float, reason: str = "") -> None:
        super().__init__(reason or f"retry requested after {after:g}s")
        self.after = after


class Reject(Exception):
    """Raised by a task for a message that can never succeed (a poison message).

    With `[dead_letter] topic` set it is forwarded there and acked; without, it is given back with
    the maximum backoff and logged as an error: never silently dropped.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PayloadError(Reject, ValueError):
    """`Message.json()` / `.text()` on a payload that does not decode: a reject, and a ValueError."""


class PublishError(Exception):
    """Raised by `consumerd.publish` for an output that may not be published (a topic outside
    `[publish] topics`, over a limit): an ordinary failure of the task, retried with backoff."""


class TaskCancelled(BaseException):
    """Raised inside a running task when the daemon ends it: its timeout passed, or the daemon stops.

    A BaseException, like KeyboardInterrupt, so a task's `except Exception:` does not swallow it:
    `finally:` blocks and `except TaskCancelled:` clean-ups run, then the worker exits. A task that
    ignores it is killed (SIGKILL) after the kill grace (5 s).
    """
