"""A loopback stand-in for Sentry: the DSN points at it, and the SDK posts its envelopes to /api/1/envelope/."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
from collections.abc import Iterator

import pytest


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
    """The DSN of a stand-in listening on loopback, and what it received: (path, body) pairs."""
    received: list[tuple[str, bytes]] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (Collector,), {"received": received}))
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
