"""`make run`: a local Pub/Sub emulator, a demo topic and subscription, the daemon, demo messages.

Ctrl-C drains the daemon (it gets the SIGINT itself, as in a terminal) and then stops the emulator.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .cli import main as consumerd
from .emulator import Emulator

PROJECT = "demo"
TOPIC = "demo-jobs"
SUBSCRIPTION = "demo-jobs"
DEMO_MESSAGES = [
    ("echo", "hello from make run", 3),
    ("hash", '{"ms": 50}', 4),
    ("sleep", '{"seconds": 2}', 2),
    ("fail", "this one fails and comes back with a growing delay", 1),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="config/dev.toml")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon handles Ctrl-C; we wait for it
    with Emulator() as emulator:
        os.environ.update(PUBSUB_EMULATOR_HOST=emulator.host, GOOGLE_CLOUD_PROJECT=PROJECT)
        print(f"devrun: Pub/Sub emulator on {emulator.host} (log: {emulator.log_path})", flush=True)
        consumerd(["setup", "--topic", TOPIC, "--subscription", SUBSCRIPTION, "--ack-deadline", "30"])
        daemon, notify = start_daemon(args.config)
        if not await_ready(notify, daemon):
            return daemon.wait()
        publish_demo_messages()
        print("devrun: demo messages published; press Ctrl-C to drain and stop", flush=True)
        code = daemon.wait()
        print(f"devrun: daemon exited with {code}; stopping the emulator", flush=True)
        return code


def start_daemon(config: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(tempfile.mkdtemp(prefix="consumerd-devrun-"), "notify.sock")
    notify.bind(path)
    env = dict(os.environ, NOTIFY_SOCKET=path)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "consumerd", "run", "--config", config],
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return daemon, notify


def await_ready(notify: socket.socket, daemon: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    """Wait for the daemon's READY=1 on our notify socket, as systemd would."""
    deadline = time.monotonic() + timeout
    notify.settimeout(0.5)
    while time.monotonic() < deadline and daemon.poll() is None:
        try:
            if b"READY=1" in notify.recv(4096):
                return True
        except TimeoutError:
            continue
    return False


def publish_demo_messages() -> None:
    for task, data, count in DEMO_MESSAGES:
        args = ["publish", "--topic", TOPIC, "--attr", f"task={task}", "--count", str(count), data]
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                consumerd(args)
            finally:
                sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
