"""The documented Sentry recipe (examples/sentry_hooks.py) with the real sentry-sdk, in a real forked worker.

A loopback HTTP server stands in for Sentry: the DSN points at it, and the SDK posts its envelopes to
/api/1/envelope/. The worker is forked from this process and runs `serve` as the fork server's
children do: start hooks (sentry_sdk.init), the job, the failure hook, the stop hooks (flush).
"""

from __future__ import annotations

import gzip
import http.server
import importlib.util
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumerd.ipc.framing import encode_units, recv_frame, result_reader
from consumerd.ipc.records import Job, Outcome
from consumerd.message import Message

pytest.importorskip("sentry_sdk")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sentry_hooks.py"


class Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def sentry() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []
    handler = type("Handler", (Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://public@127.0.0.1:{server.server_address[1]}/1", received
    server.shutdown()
    server.server_close()


def events(received: list[tuple[str, bytes]]) -> list[dict]:
    """The error events among the envelopes (header line, then item header and payload pairs)."""
    found = []
    for path, body in received:
        assert path.startswith("/api/1/envelope/")
        lines = body.split(b"\n")
        for header, payload in zip(lines[1::2], lines[2::2]):
            if json.loads(header).get("type") == "event":
                found.append(json.loads(payload))
    return found


def worker(sock: socket.socket, dsn: str) -> int:
    """The child: the example's hooks and one failing task in the registry, then `serve`, as a worker."""
    from consumerd.worker.child import serve
    from consumerd.worker.registry import REGISTRY, task

    os.environ["SENTRY_DSN"] = dsn
    spec = importlib.util.spec_from_file_location("sentry_hooks_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))

    @task("charge")
    def charge(msg: Message) -> None:
        raise ValueError("the card was declined")

    return int(serve(sock, REGISTRY, max_tasks=1, worker_id=1))


def test_a_failed_task_reaches_sentry_with_the_task_and_message_id_as_tags(sentry):
    dsn, received = sentry
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the worker
        code = 1
        try:
            ours.close()
            code = worker(theirs, dsn)
        finally:
            os._exit(code)
    theirs.close()
    message = Message("m-sentry-1", b"{}", {"task": "charge"}, None, 2, "", "s")
    ours.sendall(encode_units([Job(1, "charge", message, 0.0, 2)]))
    ours.settimeout(30)
    result = recv_frame(ours, result_reader())
    assert result is not None and result.outcome is Outcome.ERROR and "declined" in result.error
    ours.close()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # the stop hook (flush) ran and the worker exited cleanly
    deadline = time.monotonic() + 10
    while not events(received) and time.monotonic() < deadline:
        time.sleep(0.05)
    [event] = events(received)
    assert event["tags"]["task"] == "charge" and event["tags"]["message_id"] == "m-sentry-1"
    assert event["tags"]["fate"] == "retry" and event["extra"]["attempt"] == 2
    [exception] = event["exception"]["values"]
    assert exception["type"] == "ValueError" and exception["value"] == "the card was declined"
