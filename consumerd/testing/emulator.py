"""Start and stop the Google Pub/Sub emulator on a free loopback port (for `make run`, tests, benchmarks).

The emulator keeps running when its port is taken (it only logs a BindException), so readiness is
"Server started" in its log, never its exit code. It runs in its own process group and is stopped
by that group, so the Java process never outlives us.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


class EmulatorError(RuntimeError):
    pass


def sdk_root() -> Path:
    """The Google Cloud SDK root, from the real `gcloud` binary's location (fast) or `gcloud info`."""
    gcloud = shutil.which("gcloud")
    if not gcloud:
        raise EmulatorError("gcloud not found: install google-cloud-cli-pubsub-emulator (see README)")
    candidate = Path(os.path.realpath(gcloud)).parent.parent
    if (candidate / "platform" / "pubsub-emulator").is_dir():
        return candidate
    out = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def unavailable() -> str:
    """Why the emulator cannot start here (empty: it can)."""
    try:
        root = sdk_root()
    except (EmulatorError, OSError, subprocess.CalledProcessError) as exc:
        return str(exc)
    if not (root / "platform" / "pubsub-emulator").is_dir():
        return f"no pubsub emulator under {root} (apt-get install google-cloud-cli-pubsub-emulator)"
    if not shutil.which("java"):
        return "java not found (the emulator needs Java 17)"
    return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class Emulator:
    def __init__(self, port: int | None = None, java_heap: str = "1g") -> None:
        self.port = port or free_port()
        self.java_heap = java_heap
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="pubsub-emulator-", suffix=".log", delete=False)

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> str:
        return self._log.name

    def start(self, timeout: float = 60.0) -> Emulator:
        binary = sdk_root() / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
        env = dict(os.environ, JAVA_OPTS=f"-Xmx{self.java_heap}")
        self._log.truncate(0)
        self.process = subprocess.Popen(
            [str(binary), f"--host={LOOPBACK}", f"--port={self.port}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        self._await_started(timeout)
        return self

    def _await_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = Path(self.log_path).read_text(errors="replace")
            if "BindException" in text:
                self.stop()
                raise EmulatorError(f"port {self.port} is taken")
            if "Server started" in text:
                return
            if self.process is not None and self.process.poll() is not None:
                raise EmulatorError(f"emulator exited with {self.process.returncode}: {text[-500:]}")
            time.sleep(0.05)
        self.stop()
        raise EmulatorError(f"emulator did not start within {timeout:.0f}s; log: {self.log_path}")

    def signal(self, signum: int) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
