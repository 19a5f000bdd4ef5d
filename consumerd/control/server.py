"""The control socket: `consumerd status|pause|resume|drain|scale N` talk to the running daemon here.

An AF_UNIX stream socket, mode 0600 (0660 with `[control] group`), served from the supervisor's
selector: accepting, reading and writing never block the loop. One request per connection, a JSON
line of at most MAX_REQUEST bytes; a client that sends more, or is silent for CLIENT_TIMEOUT, is
dropped. At most MAX_CLIENTS are open at once, a new one taking the place of the oldest: a flood of
connections holds that many descriptors, never more, and the next `consumerd status` (a new
connection too) is still answered. SO_PEERCRED tells who is asking: anyone who can connect may
read `status`; only root or the daemon's own uid may change anything.
"""

from __future__ import annotations

import dataclasses
import enum
import grp
import json
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumerd.errors import ConfigError

MAX_REQUEST = 4096
CLIENT_TIMEOUT = 2.0
MAX_CLIENTS = 16  # at once; one operator's commands need one


class Command(enum.StrEnum):
    STATUS = "status"
    PAUSE = "pause"
    RESUME = "resume"
    DRAIN = "drain"
    SCALE = "scale"


READ_ONLY = frozenset({Command.STATUS})


@dataclasses.dataclass(frozen=True)
class Request:
    command: Command
    args: dict[str, Any]
    uid: int


@dataclasses.dataclass(eq=False)
class Client:
    sock: socket.socket
    uid: int
    deadline: float
    buffer: bytearray = dataclasses.field(default_factory=bytearray)

    def fileno(self) -> int:
        return self.sock.fileno()


class ControlServer:
    def __init__(self, path: str, group: str = "", forget: Callable[[socket.socket], None] = lambda _s: None) -> None:
        self.path = path
        self._forget = forget  # called before a client's socket closes (the caller's selector drops it)
        self.clients: dict[int, Client] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale(Path(path))
            self.sock.bind(path)
            os.chmod(path, 0o660 if group else 0o600)
            if group:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except (OSError, KeyError) as exc:
            self.sock.close()
            raise ConfigError(f"control.socket: cannot listen on {path}: {exc}") from None
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, now: float) -> Client | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:  # out of descriptors: free one of ours; the waiting client is taken next time
            if self.clients:
                self.drop(next(iter(self.clients.values())))
            return None
        if len(self.clients) >= MAX_CLIENTS:
            self.drop(next(iter(self.clients.values())))  # the oldest: dicts keep the order clients came in
        conn.setblocking(False)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        client = Client(conn, uid, now + CLIENT_TIMEOUT)
        self.clients[conn.fileno()] = client
        return client

    def read(self, client: Client) -> Request | None:
        """The client's request once its line is complete; None while incomplete. Drops bad clients."""
        if client.sock.fileno() == -1:
            return None  # evicted earlier in this turn of the loop; its event was already reported
        try:
            chunk = client.sock.recv(MAX_REQUEST + 1)
        except BlockingIOError:
            return None
        except OSError:
            chunk = b""
        client.buffer += chunk
        if not chunk or len(client.buffer) > MAX_REQUEST:
            self.reply(client, {"ok": False, "error": "request too large"} if chunk else None)
            return None
        if b"\n" not in client.buffer:
            return None
        try:
            body = json.loads(client.buffer.split(b"\n", 1)[0])
            name, args = body["command"], body.get("args", {})
            if name not in Command.__members__.values() or not isinstance(args, dict):
                raise ValueError(f"unknown command {str(name)[:40]!r}")
            command = Command(name)
        except (ValueError, KeyError, TypeError) as exc:
            self.reply(client, {"ok": False, "error": f"bad request: {exc}"})
            return None
        if command not in READ_ONLY and client.uid not in (0, os.getuid()):
            self.reply(client, {"ok": False, "error": f"permission denied: uid {client.uid} may only read status"})
            return None
        return Request(command, args, client.uid)

    def reply(self, client: Client, answer: dict[str, Any] | None) -> None:
        """Send the answer if the socket takes it at once, then close: a slow reader is dropped."""
        if answer is not None:
            try:
                client.sock.send(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass
        self.drop(client)

    def drop(self, client: Client) -> None:
        self.clients.pop(client.fileno(), None)
        self._forget(client.sock)
        client.sock.close()

    def stale(self, now: float) -> list[Client]:
        return [c for c in self.clients.values() if now >= c.deadline]

    def close(self) -> None:
        for client in list(self.clients.values()):
            self.drop(client)
        self._forget(self.sock)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _remove_stale(path: Path) -> None:
    """A socket file left by a daemon that was killed: remove it (never anything that is not a socket)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    finally:
        probe.close()
    raise OSError(f"another daemon is listening on {path}")
