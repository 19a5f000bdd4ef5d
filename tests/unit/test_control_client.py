"""The control client retries what is safe to retry: an unsent request, and status."""

import json
import socket
import threading
from pathlib import Path

import pytest

from consumerd.control.client import request


def serve(path: Path, drop_first: int) -> tuple[threading.Thread, list[bytes]]:
    """Accept connections; close the first ``drop_first`` without an answer, answer the next one."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    seen: list[bytes] = []

    def run() -> None:
        with server:
            for n in range(drop_first + 1):
                conn, _ = server.accept()
                with conn:
                    seen.append(conn.recv(4096))
                    if n == drop_first:
                        conn.sendall(json.dumps({"ok": True, "state": "running"}).encode() + b"\n")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


def test_status_is_asked_again_when_the_daemon_dropped_the_connection(tmp_path):
    thread, seen = serve(tmp_path / "c.sock", drop_first=2)
    assert request(str(tmp_path / "c.sock"), "status", timeout=5) == {"ok": True, "state": "running"}
    thread.join(5)
    assert len(seen) == 3


def test_a_command_that_changes_something_is_sent_once(tmp_path):
    thread, seen = serve(tmp_path / "c.sock", drop_first=1)
    with pytest.raises(ConnectionError):
        request(str(tmp_path / "c.sock"), "drain", timeout=5)
    assert len(seen) == 1 and b'"drain"' in seen[0]
    request(str(tmp_path / "c.sock"), "status", timeout=5)  # lets the server thread finish
    thread.join(5)


def test_no_daemon_listening_fails_at_once(tmp_path):
    import time

    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "c.sock"))
    dead.close()  # the file stays, nobody listens: what a killed daemon leaves
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        request(str(tmp_path / "c.sock"), "status", timeout=5)
    assert time.monotonic() - started < 1
