"""`make run`: what a newcomer sees in the first minute (its own emulator, demo tasks, Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from harness.daemon import REPO

pytestmark = pytest.mark.integration


def test_make_run_shows_every_shape_dead_letters_the_failing_demo_and_prints_a_publish_command(emulator):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUMERD_", "PUBSUB_", "NOTIFY_SOCKET"))}
    env["CONSUMERD_METRICS__LISTEN"] = "127.0.0.1:0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.devrun", "--config", "config/dev.toml"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a terminal of its own: Ctrl-C goes to the whole foreground group
    )
    seen: list[str] = []
    deadline = time.monotonic() + 120
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if '"message.dead_lettered"' in line and '"fail"' in line:
                break
            assert time.monotonic() < deadline, "".join(seen[-20:])
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the daemon drains, then devrun stops the emulator
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(seen) + rest
    assert proc.returncode == 0, text[-3000:]
    assert "consumerd publish --topic demo-jobs --attr task=echo" in text and "PUBSUB_EMULATOR_HOST=127.0.0.1:" in text
    done = [line for line in text.splitlines() if '"message.done"' in line]
    for task in ("echo", "hash", "sleep", "resize", "fetch", "rows"):  # sync, async, batch, per-task options
        assert any(f'"task": "{task}"' in line for line in done), task
    assert text.count('"task": "fail", "attempt"') >= 3  # retried with backoff, then dead-lettered
