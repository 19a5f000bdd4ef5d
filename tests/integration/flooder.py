"""The hostile client of the flood test, as a process of its own: threads opening connections as fast
as they can, each sending half a request and keeping its last HELD connections open.

    python tests/integration/flooder.py SECONDS HOST:PORT THREADS [CONTROL_SOCKET THREADS]

Prints the connections opened, per kind, as one JSON line when done.
"""

from __future__ import annotations

import collections
import json
import socket
import sys
import threading
import time

HELD = 100


def flood(family: int, address: object, half: bytes, until: float, opened: list[int]) -> None:
    held: collections.deque[socket.socket] = collections.deque()
    while time.monotonic() < until:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect(address)
            sock.send(half)
            opened.append(1)
            held.append(sock)
        except OSError:
            sock.close()
        if len(held) > HELD:
            held.popleft().close()
    for sock in held:
        sock.close()


def main(argv: list[str]) -> None:
    until = time.monotonic() + float(argv[0])
    host, _, port = argv[1].rpartition(":")
    http: list[int] = []
    control: list[int] = []
    threads = [
        threading.Thread(target=flood, args=(socket.AF_INET, (host, int(port)), b"GET /metr", until, http)) for _ in range(int(argv[2]))
    ]
    if len(argv) > 3:
        threads += [
            threading.Thread(target=flood, args=(socket.AF_UNIX, argv[3], b'{"command": "sta', until, control)) for _ in range(int(argv[4]))
        ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"http": len(http), "control": len(control)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
