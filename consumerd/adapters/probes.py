"""A small HTTP server for probes and scrapes that whoever connects cannot exhaust.

One thread waiting on an epoll set of its own; a connection is never given a thread. At most
MAX_CONNECTIONS are open, each with REQUEST_TIMEOUT to send its request and take the answer. When
the table is full a new connection takes the place of the oldest unfinished one: a client that
opens many and sends half a request pushes out only its own. The next probe, a new connection too,
is still served: with TCP_DEFER_ACCEPT the kernel hands a connection over only once its first
bytes came, so a probe's request is there when it is accepted, and it is answered in that same
turn, however fast others push out the oldest. Dropped connections are reset, leaving no TIME_WAIT
behind. The queue of connections not yet accepted (LISTEN_BACKLOG) is drained ACCEPT_BATCH at a
time; were it ever full, the kernel would drop new SYNs and a probe's connect would wait 1 s for its
retry. One request per connection: GET, request line and headers within MAX_REQUEST_HEAD bytes,
answered, then closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

MAX_CONNECTIONS = 64  # at once: Prometheus and a few probes need a handful
REQUEST_TIMEOUT = 3.0  # seconds from accept to the answer taken: kubelet and Prometheus send at once
MAX_REQUEST_HEAD = 8192  # bytes of request line and headers
ACCEPT_BATCH = 64  # connections accepted per turn before those already open are served
LISTEN_BACKLOG = 4096  # connections the kernel holds for us until accepted (capped by net.core.somaxconn)

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
Route = Callable[[bytes], bytes]  # a GET's path (no query) -> the whole response (`response()`)


class ProbeServer:
    """Sockets are used with MSG_DONTWAIT (no switch to non-blocking each) and closing one takes it out
    of the epoll set: one that sends half a request costs five calls (accept, recv, epoll_ctl, the
    SO_LINGER that makes its close a reset, close)."""

    def __init__(self, listen: str, route: Route, clock: Callable[[], float] = time.monotonic) -> None:
        """``listen``: HOST:PORT, HOST an address, a name or a bracketed IPv6 address; raises OSError."""
        host, _, port = listen.rpartition(":")
        bare = host.strip("[]")
        self.route = route
        self.clock = clock
        self.sock = socket.create_server(
            (bare, int(port)), family=socket.AF_INET6 if ":" in bare else socket.AF_INET, backlog=LISTEN_BACKLOG
        )
        # Queued for accept() only once its first bytes came: a probe's request is there when we accept
        # it, and is answered in that turn, however fast others connect and push out the oldest.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, int(REQUEST_TIMEOUT))
        self.sock.setblocking(False)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.connections: dict[int, _Connection] = {}  # by descriptor, in the order accepted: the first is the oldest
        self.epoll = select.epoll()
        self.epoll.register(self.sock.fileno(), select.EPOLLIN)
        self._wake, self._waker = socket.socketpair()  # stop() writes to _waker: poll() returns at once
        self.epoll.register(self._wake.fileno(), select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="consumerd-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._waker.send(b"x")
        if self._thread.ident is not None:
            self._thread.join(timeout=5)
        for conn in list(self.connections.values()):
            self._close(conn)
        for sock in (self.sock, self._wake, self._waker):
            sock.close()
        self.epoll.close()

    def _serve(self) -> None:
        while not self._stopping:
            self.serve_once()

    def serve_once(self) -> None:
        """One turn: wait for the next event or deadline, handle what is ready, drop the expired."""
        now = self.clock()
        oldest = next(iter(self.connections.values()), None)
        listener = self.sock.fileno()
        for fd, _ in self.epoll.poll(max(0.0, oldest.deadline - now) if oldest else -1):
            if fd == listener:
                self._accept()
            elif conn := self.connections.get(fd):  # by its state: the event may be a closed one's whose descriptor it got
                (self._read if conn.outbox is None else self._write)(conn)
        now = self.clock()
        while (oldest := next(iter(self.connections.values()), None)) and oldest.deadline <= now:
            self._close(oldest, abort=True)

    def _accept(self) -> None:
        deadline = self.clock() + REQUEST_TIMEOUT
        for _ in range(ACCEPT_BATCH):  # then serve the others: a flood of connects must not starve them
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors (EMFILE, ENFILE): free one of ours, the listener stays
                if not self.connections:
                    return
                self._evict()
                continue
            if len(self.connections) >= MAX_CONNECTIONS:
                self._evict()
            conn = _Connection(sock, deadline)
            self.connections[sock.fileno()] = conn
            self._read(conn)  # the request usually came with the connection: answer it in this turn

    def _evict(self) -> None:
        """Close the oldest connection still sending its request (else the oldest of all)."""
        victim = next((c for c in self.connections.values() if c.outbox is None), None)
        self._close(victim or next(iter(self.connections.values())), abort=True)

    def _read(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(MAX_REQUEST_HEAD + 1 - len(conn.inbox), socket.MSG_DONTWAIT)
        except BlockingIOError:
            chunk = None
        except OSError:
            chunk = b""
        if chunk == b"":
            self._close(conn)
            return
        conn.inbox += chunk or b""
        head, blank, _ = conn.inbox.partition(b"\r\n\r\n")
        if blank:
            self._send(conn, self._answer(bytes(head)))
        elif len(conn.inbox) > MAX_REQUEST_HEAD:
            self._send(conn, response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"request line and headers too large\n"))
        else:
            self._watch(conn, select.EPOLLIN)

    def _answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b"\r\n")[0].partition(b" ")
        target, _, version = rest.partition(b" ")
        if not target.startswith(b"/") or not version.startswith(b"HTTP/1."):
            return response(HTTPStatus.BAD_REQUEST, b"bad request\n")
        if method != b"GET":
            return response(HTTPStatus.METHOD_NOT_ALLOWED, b"only GET\n", extra=b"Allow: GET\r\n")
        try:
            return self.route(target.split(b"?", 1)[0])
        except Exception:  # a failing collector must cost one scrape, not the probes' thread
            logging.getLogger("consumerd.metrics").exception("metrics.answer_failed")
            return response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n")

    def _send(self, conn: _Connection, answer: bytes) -> None:
        conn.outbox = memoryview(answer)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        assert conn.outbox is not None
        try:
            sent = conn.sock.send(conn.outbox, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if conn.outbox:
            self._watch(conn, select.EPOLLOUT)  # a slow reader: the rest when it has room, within the deadline
            return
        with contextlib.suppress(OSError):  # closing with unread bytes would reset the connection, answer and all
            conn.sock.recv(MAX_REQUEST_HEAD, socket.MSG_DONTWAIT)
        self._close(conn)

    def _watch(self, conn: _Connection, events: int) -> None:
        if conn.watched == events:
            return
        if conn.watched:
            self.epoll.modify(conn.sock.fileno(), events)
        else:
            self.epoll.register(conn.sock.fileno(), events)
        conn.watched = events

    def _close(self, conn: _Connection, abort: bool = False) -> None:
        """``abort``: reset, not close: a dropped connection leaves no TIME_WAIT behind, however many a flood makes.
        Closing the descriptor takes it out of the epoll set."""
        del self.connections[conn.sock.fileno()]
        if abort:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        conn.sock.close()


@dataclasses.dataclass(eq=False, slots=True)
class _Connection:
    sock: socket.socket
    deadline: float  # the clock's time by which it must have sent its request and taken the answer
    inbox: bytearray = dataclasses.field(default_factory=bytearray)
    outbox: memoryview | None = None  # the answer's unsent rest, once there is one
    watched: int = 0  # the epoll events it is registered for (0: not registered)


def response(status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8", extra: bytes = b"") -> bytes:
    head = f"HTTP/1.0 {status.value} {status.phrase}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + extra + b"Connection: close\r\n\r\n" + body
