"""Read-only looks at the process tree in /proc, for the benchmarks, the chaos soak and the tests.

Not part of the wheel: consumerd itself needs none of it.
"""

from __future__ import annotations

from pathlib import Path


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process we can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process below ``pid``."""
    children: dict[int, list[tuple[int, str]]] = {}
    for child, (parent, state) in process_table().items():
        children.setdefault(parent, []).append((child, state))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def workers_of(daemon_pid: int) -> list[int]:
    """A consumerd's workers: the children of its fork server, which is the daemon's child."""
    table = process_table()
    fork_servers = [pid for pid, (parent, _) in table.items() if parent == daemon_pid]
    return [pid for pid, (parent, _) in table.items() if parent in fork_servers]


def alive(pid: int) -> bool:
    """Running (a zombie does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def status_kb(pid: int, field: str) -> int | None:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in kB, or None if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
