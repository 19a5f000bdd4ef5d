"""The probe server's and the control socket's bounds, driven turn by turn with a fake clock.

Real sockets; the probe server's thread is not started (but in one test): each `serve_once()` is
one turn of it.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from consumerd.adapters.probes import MAX_CONNECTIONS, MAX_REQUEST_HEAD, REQUEST_TIMEOUT, ProbeServer
from consumerd.adapters.prometheus import Metrics, MetricsServer
from consumerd.control.server import MAX_CLIENTS, ControlServer
from tests.unit.fakes import Clock

PROBE = b"GET /healthz HTTP/1.1\r\nHost: consumerd\r\nUser-Agent: kube-probe/1.31\r\n\r\n"
HALF = b"GET /metr"  # half a request line, and then nothing


@pytest.fixture
def clock() -> Clock:
    return Clock(100.0)


@pytest.fixture
def server(clock: Clock) -> Iterator[ProbeServer]:
    s = MetricsServer(Metrics("1.0", lambda: ({}, {}), ()), "127.0.0.1:0", clock=clock).server
    yield s
    s.stop()


def connect(server: ProbeServer, payload: bytes) -> socket.socket:
    client = socket.create_connection(server.sock.getsockname(), timeout=5)
    client.sendall(payload)
    return client


def answer(client: socket.socket) -> bytes:
    """Everything the server sent before it closed the connection."""
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


def closed(client: socket.socket) -> bool:
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True  # a dropped connection is reset
    except BlockingIOError:
        return False  # still open, nothing sent
    finally:
        client.setblocking(True)


def test_a_full_table_drops_its_oldest_unfinished_connection_and_still_answers_the_probe(server):
    half = [connect(server, HALF) for _ in range(MAX_CONNECTIONS)]
    while len(server.connections) < MAX_CONNECTIONS:
        server.serve_once()
    probe = connect(server, PROBE)
    server.serve_once()
    assert answer(probe).startswith(b"HTTP/1.0 200 OK\r\n")
    assert closed(half[0]) and not any(closed(c) for c in half[1:])
    assert len(server.connections) == MAX_CONNECTIONS - 1  # the probe was answered and closed at once
    more = [connect(server, HALF) for _ in range(10)]
    server.serve_once()
    assert len(server.connections) == MAX_CONNECTIONS
    assert all(closed(c) for c in half[1:10]) and not any(closed(c) for c in half[10:] + more)


def test_a_connection_that_has_not_sent_its_request_is_closed_at_its_deadline(server, clock):
    early = [connect(server, HALF) for _ in range(3)]
    server.serve_once()
    clock.advance(REQUEST_TIMEOUT - 0.5)
    late = connect(server, HALF)
    server.serve_once()
    assert len(server.connections) == 4
    clock.advance(0.5)
    server.serve_once()
    assert all(closed(c) for c in early) and not closed(late)
    assert len(server.connections) == 1
    clock.advance(REQUEST_TIMEOUT)
    server.serve_once()
    assert closed(late) and server.connections == {}


@pytest.mark.parametrize(
    ("request_head", "status", "body"),
    [
        (PROBE, b"200 OK", b"ok\n"),
        (b"GET /readyz?verbose HTTP/1.0\r\n\r\n", b"503 Service Unavailable", b"starting\n"),
        (b"GET /admin HTTP/1.1\r\n\r\n", b"404 Not Found", b"not found: /metrics, /healthz, /readyz\n"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405 Method Not Allowed", b"only GET\n"),
        (b"HEAD /healthz HTTP/1.1\r\n\r\n", b"405 Method Not Allowed", b"only GET\n"),
        (b"GET /healthz\r\n\r\n", b"400 Bad Request", b"bad request\n"),  # no version: HTTP/0.9 is not served
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400 Bad Request", b"bad request\n"),  # TLS to a plain port
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_HEAD, b"431 Request Header Fields Too Large", None),
    ],
)
def test_requests_are_strict_get_with_a_bounded_head_answered_then_closed(server, request_head, status, body):
    client = connect(server, request_head)
    server.serve_once()
    head, _, received = answer(client).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 " + status + b"\r\n")
    assert b"Connection: close" in head and b"Content-Type: text/plain; charset=utf-8" in head
    assert body is None or received == body
    assert (b"Allow: GET" in head) is status.startswith(b"405")
    assert server.connections == {}


def test_metrics_keep_prometheus_clients_content_type_and_body(server):
    client = connect(server, b"GET /metrics HTTP/1.1\r\nAccept: text/plain\r\n\r\n")
    server.serve_once()
    head, _, body = answer(client).partition(b"\r\n\r\n")
    assert f"Content-Type: {CONTENT_TYPE_LATEST}".encode() in head and f"Content-Length: {len(body)}".encode() in head
    assert b"# TYPE consumerd_messages_total counter" in body and b"consumerd_build_info" in body


def test_the_thread_serves_and_stops():
    server = MetricsServer(Metrics("1.0", lambda: ({}, {}), ()), "127.0.0.1:0")
    server.start()
    with urllib.request.urlopen(f"http://{server.address}/healthz", timeout=5) as response:
        assert response.status == 200 and response.read() == b"ok\n"
    server.stop()
    assert not server.server._thread.is_alive() and server.server.sock.fileno() == -1


def test_the_control_socket_holds_at_most_max_clients_and_drops_the_oldest(tmp_path):
    server = ControlServer(str(tmp_path / "c.sock"))
    peers, clients = [], []
    for i in range(MAX_CLIENTS * 4):
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(server.path)
        peers.append(peer)
        clients.append(server.accept(now=float(i)))
        assert len(server.clients) == min(i + 1, MAX_CLIENTS)
    assert list(server.clients.values()) == clients[-MAX_CLIENTS:]
    assert all(closed(p) for p in peers[:-MAX_CLIENTS]) and not any(closed(p) for p in peers[-MAX_CLIENTS:])
    assert server.read(clients[0]) is None  # an event reported for it before it was dropped changes nothing
    assert len(server.clients) == MAX_CLIENTS
    server.close()
