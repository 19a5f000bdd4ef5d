"""The client side of the control socket, for `consumerd status|pause|resume|drain|scale N`."""

from __future__ import annotations

import json
import socket
from typing import Any


def request(path: str, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The client side, for the CLI: one request, one answer."""
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
        raise ConnectionError("the daemon closed the connection without an answer")
    answer: dict[str, Any] = json.loads(data)
    return answer


def format_status(status: dict[str, Any]) -> str:
    c = status["counters"]
    lines = [
        f"state: {status['state']}{' (paused)' if status['paused'] else ''}, up {status['uptime_s']:.0f} s, "
        f"concurrency {status['concurrency']}, {status['workers']} workers",
        f"queued {status['queued']}, being dead-lettered {status['dead_lettering']}, held {status['held_bytes']} bytes",
        f"received {c['received']}, succeeded {c['succeeded']}, failed {c['failed']}, dead-lettered {c['dead_lettered']}, "
        f"lease lapsed {c['lease_lapsed']}",
    ]
    if status.get("pull_error"):
        lines.append(f"last pull failed: {status['pull_error']}")
    running = status["running"]
    lines.append(f"running ({len(running)}):")
    if running:
        lines.append(f"  {'PID':>7}  {'TASK':<20} {'MESSAGE ID':<20} {'ATTEMPT':>7} {'RUNNING':>9} {'RSS':>9}")
        for job in running:
            rss = f"{job['rss_kb'] / 1024:.1f} MB" if job.get("rss_kb") else "-"
            lines.append(
                f"  {job['worker_pid']:>7}  {job['task'][:20]:<20} {job['message_id'][:20]:<20} "
                f"{job['attempt']:>7} {job['running_s']:>8.1f}s {rss:>9}"
            )
    return "\n".join(lines)
