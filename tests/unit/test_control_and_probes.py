"""The probes' answers and the control socket's request handling (real AF_UNIX sockets, no daemon)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from consumerd.adapters.prometheus import HEALTHY_WITHIN, Health
from consumerd.control.client import request
from consumerd.control.server import MAX_REQUEST, ControlServer
from consumerd.errors import ConfigError


def test_health_and_readiness_from_the_published_snapshot():
    assert Health(tick_at=0.0, state="starting").live(now=1e6)  # start-up has timeouts of its own
    assert Health(tick_at=100.0, state="running").live(now=100.0 + HEALTHY_WITHIN - 0.1)
    assert not Health(tick_at=100.0, state="running").live(now=100.0 + HEALTHY_WITHIN)
    assert Health(state="starting").not_ready_because() == "starting"
    assert Health(state="running", ready=True).not_ready_because() == ""
    assert Health(state="draining", ready=True).not_ready_because() == "draining"
    assert Health(state="running", ready=True, paused=True).not_ready_because() == "paused"
    assert Health(state="running", ready=True, pull_error="DeadlineExceeded: x").not_ready_because().startswith("Pub/Sub unreachable")


@pytest.fixture
def server(tmp_path):
    s = ControlServer(str(tmp_path / "c.sock"))
    yield s
    s.close()


def _connect(server: ControlServer, payload: bytes) -> tuple[socket.socket, object]:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(server.path)
    client.sendall(payload)
    conn = server.accept(now=0.0)
    assert conn is not None and conn.uid == os.getuid()
    return client, server.read(conn)


def test_a_request_line_is_parsed_and_answered(server):
    client, req = _connect(server, b'{"command": "scale", "args": {"n": 3}}\n')
    assert req.command == "scale" and req.args == {"n": 3}
    client.close()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"not json\n", "bad request"),
        (b'{"command": "rm -rf"}\n', "unknown command"),
        (b'{"command": "status", "args": [1]}\n', "bad request"),
        (b"x" * (MAX_REQUEST + 10), "too large"),
    ],
)
def test_bad_requests_get_an_error_and_the_client_is_dropped(server, payload, error):
    client, req = _connect(server, payload)
    assert req is None and server.clients == {}
    answer = json.loads(client.recv(4096))
    assert answer["ok"] is False and error in answer["error"]
    client.close()


def test_the_socket_is_owner_only_and_a_stale_one_is_replaced_but_never_a_file(tmp_path):
    path = tmp_path / "c.sock"
    first = ControlServer(str(path))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="another daemon is listening"):
        ControlServer(str(path))
    first.sock.close()  # killed without cleaning up: the file stays, nobody listens
    ControlServer(str(path)).close()
    (tmp_path / "plain").write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(str(tmp_path / "plain"))
    assert (tmp_path / "plain").read_text() == "precious"


def test_a_silent_client_is_stale_after_its_deadline(server):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(server.path)
    conn = server.accept(now=10.0)
    assert server.stale(11.0) == [] and server.stale(12.5) == [conn]
    client.close()


def test_the_cli_side_reports_a_missing_daemon(tmp_path):
    with pytest.raises(FileNotFoundError):
        request(str(tmp_path / "absent.sock"), "status")
