"""redis-server on a free loopback port, for the fleet-wide rate limit tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from consumerd.adapters.ratelimit import RedisGcra
from consumerd.testing.emulator import free_port


class RedisServer:
    """redis-server on a free loopback port, in a directory of its own, persisting nothing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen([*command, "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = RedisGcra(self.url, timeout=0.2)
        deadline = time.monotonic() + 10
        while True:  # ready once it answers PING
            try:
                probe.ping()
                break
            except Exception:
                assert self.process.poll() is None, "redis-server exited at start-up"
                assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
                time.sleep(0.02)
        probe.close()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
