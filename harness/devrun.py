"""`make run`: a local Pub/Sub emulator, a demo topic and subscription, the daemon, demo messages.

The daemon runs with `--reload`: save a change to consumerd/demo.py and the workers are replaced
with the new code, the next message runs it. Ctrl-C drains the daemon (it gets the SIGINT itself,
as in a terminal) and then stops the emulator.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from consumerd.cli import main as consumerd
from consumerd.testing.emulator import Emulator

PROJECT = "demo"
TOPIC = "demo-jobs"
SUBSCRIPTION = "demo-jobs"
DEAD_LETTER_TOPIC = "demo-dead-letters"
DEMO_MESSAGES = [
    ("echo", "hello from make run", 3),  # a plain sync task
    ("hash", '{"ms": 50}', 4),  # CPU-bound: one core per worker
    ("sleep", '{"seconds": 2}', 2),
    ("resize", '{"seconds": 1}', 4),  # per-task options: at most 2 at once, its own 10 s timeout
    ("fetch", '{"seconds": 0.5}', 20),  # async def: the 20 wait together on one worker's event loop
    ("rows", '{"row": 1}', 12),  # a batch task: called with up to 5 messages at once
    ("fail", "this one fails: retried with backoff, then dead-lettered after 3 attempts", 1),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="config/dev.toml")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon handles Ctrl-C; we wait for it
    with Emulator() as emulator:
        os.environ.update(PUBSUB_EMULATOR_HOST=emulator.host, GOOGLE_CLOUD_PROJECT=PROJECT)
        print(f"devrun: Pub/Sub emulator on {emulator.host} (log: {emulator.log_path})", flush=True)
        consumerd(
            [
                "setup",
                "--topic",
                TOPIC,
                "--subscription",
                SUBSCRIPTION,
                "--ack-deadline",
                "30",
                "--dead-letter-topic",
                DEAD_LETTER_TOPIC,
                "--max-delivery-attempts",
                "5",
            ]
        )
        daemon, notify = start_daemon(args.config)
        if not await_ready(notify, daemon):
            return daemon.wait()
        publish_demo_messages()
        print("devrun: demo messages published; press Ctrl-C to drain and stop", flush=True)
        print(try_it(emulator.host), flush=True)
        print(reload_hint(), flush=True)
        code = daemon.wait()
        print(f"devrun: daemon exited with {code}; stopping the emulator", flush=True)
        return code


RUN_DIR = tempfile.mkdtemp(prefix="consumerd-devrun-")  # this run's notify and control sockets
CONTROL_SOCKET = os.path.join(RUN_DIR, "control.sock")


def start_daemon(config: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(RUN_DIR, "notify.sock")
    notify.bind(path)
    env = dict(os.environ, NOTIFY_SOCKET=path, CONSUMERD_CONTROL__SOCKET=CONTROL_SOCKET)
    # The daemon must get Ctrl-C, which we ignore: a handled signal is reset to its default at exec,
    # an ignored one stays ignored. Not a preexec_fn: this process ran `consumerd setup` (gRPC), and
    # Python run between fork and exec in its child can abort in gRPC's fork handlers.
    ignoring = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "consumerd", "run", "--config", config, *(["--reload"] if can_reload() else [])], env=env
        )
    finally:
        signal.signal(signal.SIGINT, ignoring)
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


def try_it(host: str) -> str:
    """A command a newcomer can paste into another terminal, for the emulator running now."""
    cli = os.path.join(os.path.dirname(sys.executable), "consumerd")
    return (
        "devrun: send your own message from another terminal:\n"
        f"  PUBSUB_EMULATOR_HOST={host} GOOGLE_CLOUD_PROJECT={PROJECT} {cli} publish --topic {TOPIC} --attr task=echo 'hi there'\n"
        f"  (tasks: echo, hash, sleep, resize, fetch, rows, fail, noop; status: {cli} status --socket {CONTROL_SOCKET})\n"
        "devrun: the documentation: make docs-serve, then open http://127.0.0.1:8000"
    )


def can_reload() -> bool:
    """`run --reload` needs watchfiles (the dev extra, in the venv `make run` sets up)."""
    return importlib.util.find_spec("watchfiles") is not None


def reload_hint() -> str:
    if not can_reload():
        return "devrun: to reload the tasks as you edit them: pip install -e '.[dev]' (watchfiles), then make run again"
    return (
        "devrun: edit consumerd/demo.py (say, what `echo` logs) and save: the workers reload with the new code\n"
        "  (code.changed, then code.ready) and the next message runs it; a typo is reload.rejected, the old code runs on"
    )


if __name__ == "__main__":
    sys.exit(main())
