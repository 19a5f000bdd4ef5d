"""Native journald output: each log event becomes a journal entry with its fields as journal fields.

Used when stdout is the journal (JOURNAL_STREAM names stdout's device and inode, as systemd
documents), so `journalctl -u consumerd CONSUMERD_TASK=resize` and `journalctl -p err` work. The
native protocol is a datagram of KEY=VALUE lines to /run/systemd/journal/socket; values containing
a newline use the binary form (KEY, newline, 64-bit little-endian length, value). Written here
rather than taken from systemd-python (a C extension that needs libsystemd headers to build) or
cysystemd: both send on a blocking socket, and a stalled journal must never stall the daemon.
Sends that would block are dropped and counted. Each field is cut at MAX_FIELD bytes; an entry
still too large for one datagram goes the way `sd_journal_send` sends it: written to a sealed memfd
whose descriptor travels in an empty datagram (journald reads entries of up to 768 MiB that way).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import struct
import uuid
from collections.abc import Mapping
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "consumerd"
_MESSAGE_ID_NAMESPACE = uuid.UUID("6f1b0d0e-2f8a-4c11-9a61-2b8f3c4d5e6f")
PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
# Fields whose value says what happened, for the human-readable MESSAGE line.
_SUMMARY_FIELDS = ("message_id", "task", "outcome", "attempt", "error", "reason")
MAX_FIELD = 64 * 1024  # bytes per field value: a very long error text is cut, not lost
_CUT = b"... [cut]"
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def stdout_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected our stdout to the journal (JOURNAL_STREAM=DEV:INODE matches)."""
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(1)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def message_id(event: str) -> str:
    """A stable 128-bit MESSAGE_ID per event type (`journalctl MESSAGE_ID=...` finds all of one kind)."""
    return uuid.uuid5(_MESSAGE_ID_NAMESPACE, event).hex


def encode(fields: Mapping[str, Any]) -> bytes:
    parts = []
    for key, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        if len(data) > MAX_FIELD:
            data = data[: MAX_FIELD - len(_CUT)] + _CUT
        name = key.encode()
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


def journal_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    """A structlog event dict as journal fields: MESSAGE, PRIORITY, MESSAGE_ID, CONSUMERD_<KEY>."""
    name = str(event.get("event", ""))
    level = str(event.get("level", "info"))
    summary = " ".join(f"{k}={event[k]}" for k in _SUMMARY_FIELDS if event.get(k) not in (None, ""))
    fields: dict[str, Any] = {
        "MESSAGE": f"{name} {summary}".strip(),
        "PRIORITY": PRIORITY.get(level, 6),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "MESSAGE_ID": message_id(name),
        "CONSUMERD_EVENT": name,
    }
    for key, value in event.items():
        if key in ("event", "timestamp") or value is None:
            continue
        if key == "exception":
            fields["CONSUMERD_EXCEPTION"] = value
            continue
        journal_key = "CONSUMERD_" + "".join(c if c.isalnum() else "_" for c in key.upper())
        fields[journal_key] = value if isinstance(value, (str, int, float, bytes)) else _compact(value)
    return fields


def _compact(value: Any) -> str:
    import json

    try:
        return json.dumps(value, default=str, separators=(",", ":"))
    except (TypeError, ValueError):
        return str(value)


class JournalSender:
    """Non-blocking datagram sender to journald; counts what it had to drop."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.dropped = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def send(self, fields: Mapping[str, Any]) -> bool:
        data = encode(fields)
        try:
            self._sock.sendto(data, self.path)
            return True
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE and self._send_memfd(data):
                return True
            self.dropped += 1
            return False

    def _send_memfd(self, data: bytes) -> bool:
        """An entry larger than a datagram: in a sealed memfd, its descriptor sent instead."""
        try:
            fd = os.memfd_create("consumerd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            return False
        try:
            os.write(fd, data)  # a memfd takes all of it at once
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            self._sock.sendmsg([], rights, 0, self.path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


class JournalLogger:
    """structlog logger whose methods receive the final event dict and send it to journald."""

    def __init__(self, sender: JournalSender) -> None:
        self._sender = sender

    def msg(self, **event: Any) -> None:
        self._sender.send(journal_fields(event))

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class JournalHandler(logging.Handler):
    """stdlib logging (google, grpc) into the journal the same way."""

    def __init__(self, sender: JournalSender) -> None:
        super().__init__()
        self._sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = {
                "event": record.getMessage(),
                "level": record.levelname.lower(),
                "logger": record.name,
                "pid": os.getpid(),
            }
            if record.exc_info:
                event["exception"] = logging.Formatter().formatException(record.exc_info)
            self._sender.send(journal_fields(event))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
