"""The client side of the control socket, for `consumerd status|pause|resume|drain|scale N`."""

from __future__ import annotations

import json
import socket
import time
from typing import Any


class NoAnswer(ConnectionError):
    """The daemon closed the connection before it answered."""


RETRY_PAUSE = 0.05  # seconds between attempts while the daemon's socket is too busy to take us


def request(path: str, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The client side, for the CLI: one request, one answer, within ``timeout`` seconds.

    A connection the daemon could not take yet (its backlog full: EAGAIN) is tried again until the
    timeout; the request was never sent. So is `status` when the daemon dropped the connection
    before answering (a flood of clients evicts the oldest): it changes nothing. Any other command
    is sent at most once, since `drain` twice is a quick stop.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _request_once(path, command, args, max(0.1, deadline - time.monotonic()))
        except (BlockingIOError, ConnectionResetError, BrokenPipeError, NoAnswer) as exc:
            unsent = isinstance(exc, BlockingIOError)  # a refused connection (no daemon) fails at once
            if not (unsent or command == "status") or time.monotonic() + RETRY_PAUSE >= deadline:
                raise
            time.sleep(RETRY_PAUSE)


def _request_once(path: str, command: str, args: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise NoAnswer("the daemon closed the connection without an answer")
    answer: dict[str, Any] = json.loads(data)
    return answer


def format_status(status: dict[str, Any]) -> str:
    c = status["counters"]
    lines = [
        f"state: {status['state']}{' (paused)' if status['paused'] else ''}, up {status['uptime_s']:.0f} s, "
        f"concurrency {status['concurrency']}, {status['workers']} workers",
        f"queued {status['queued']}, being dead-lettered {status['dead_lettering']}, "
        f"outputs being published for {status.get('publishing_outputs', 0)}, held {status['held_bytes']} bytes",
        f"received {c['received']}, succeeded {c['succeeded']}, failed {c['failed']}, dead-lettered {c['dead_lettered']}, "
        f"lease lapsed {c['lease_lapsed']}",
    ]
    if status.get("pull_error"):
        lines.append(f"last pull failed: {status['pull_error']}")
    lines += [_generation_line(g) for g in status.get("generations", [])]
    subscriptions = status.get("subscriptions", [])
    if len(subscriptions) > 1:
        lines.append(f"subscriptions ({len(subscriptions)}):")
        for sub in subscriptions:
            state = "paused" if sub["paused"] else "pulling" if sub["pulling"] else "drained"
            error = f", last pull failed: {sub['pull_error']}" if sub["pull_error"] else ""
            lines.append(
                f"  {sub['subscription'].rpartition('/')[2]} (weight {sub['weight']}): {state}, {sub['running']} running, "
                f"{sub['queued']} queued, {sub['counters']['succeeded']} succeeded, {sub['counters']['failed']} failed{error}"
            )
    running = status["running"]
    lines.append(f"running ({len(running)}):")
    if running:
        lines.append(f"  {'PID':>7} {'GEN':>4}  {'TASK':<20} {'MESSAGE ID':<20} {'ATTEMPT':>7} {'RUNNING':>9} {'RSS':>9}")
        for job in running:
            rss = f"{job['rss_kb'] / 1024:.1f} MB" if job.get("rss_kb") else "-"
            lines.append(
                f"  {job['worker_pid']:>7} {job.get('generation', '-'):>4}  {job['task'][:20]:<20} {job['message_id'][:20]:<20} "
                f"{job['attempt']:>7} {job['running_s']:>8.1f}s {rss:>9}"
            )
    return "\n".join(lines)


def _generation_line(generation: dict[str, Any]) -> str:
    """Which workers run one generation of the task code (`current`, `starting`, or `finishing`)."""
    pids = generation["workers"]
    shown = " ".join(str(pid) for pid in pids[:16]) + (f" (+{len(pids) - 16})" if len(pids) > 16 else "")
    return (
        f"code generation {generation['generation']} ({generation['stage']}, started {generation['age_s']:.0f} s ago): "
        f"{len(pids)} workers, {generation['busy']} busy{': ' + shown if pids else ''}"
    )
