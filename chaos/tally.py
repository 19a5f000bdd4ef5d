"""The soak's results: the ledger the tasks wrote, against what was published, per subscription.

Each message is known by its subscription and id (`ledger.Key`): it is accounted for only by runs
in the subscription it was published to, a run anywhere else is a stray, and a subscription's
dead-letter topic must hold copies of exactly its own rejects, each naming it. The totals add the
subscriptions up, so a one-subscription soak reads as it always did.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from chaos.ledger import Entry, Key, Mark


class Published(NamedTuple):
    shape: str  # the task it was sent to
    fate: str


class DeadLetter(NamedTuple):
    original_id: str  # consumerd_original_message_id
    subscription: str  # consumerd_subscription: where it was rejected


class Window(NamedTuple):
    """A success between `start` and `end` may not have been acked because of `cause`."""

    cause: str
    start: float
    end: float


class Death(NamedTuple):
    """A worker that died (a `worker.exited` warning)."""

    pid: int
    at: float  # time.time(), as the ledger's
    cause: str


class Timeline(NamedTuple):
    """What happened around the tasks, against which a duplicate success is explained."""

    began: float  # when the first daemon started (time.time())
    windows: list[Window]  # the faults the harness injected
    deaths: list[Death]


OTHER = "other"  # a duplicate none of the causes explains
REPORT_GRACE = 1.0  # a worker that died this soon after a task of it succeeded may not have reported it


def account(
    name: str,
    path: str,
    published: dict[Key, Published],
    entries: list[Entry],
    dead_letters: list[DeadLetter],
    timeline: Timeline,
) -> dict[str, Any]:
    """One subscription's figures: ``name`` its short name (as in the ledger), ``path`` its full
    name (as the dead-letter copies carry it), ``dead_letters`` what its dead-letter topic held."""
    mine = {key: p for key, p in published.items() if key[0] == name}
    runs = [e for e in entries if e.subscription == name]
    successes = Counter(e.key for e in runs if e.mark is Mark.SUCCESS)
    rejected = {key for key, p in mine.items() if p.fate == "reject"}
    lost = sorted(key for key in mine if key not in rejected and not successes[key])
    duplicates = {key: n for key, n in successes.items() if n > 1}
    causes = duplicate_causes(duplicates, mine, runs, timeline)
    copies = {(name, d.original_id) for d in dead_letters}
    settled_at = [e.at for e in runs if e.mark is not Mark.START and e.key in mine]
    return {
        "published": len(mine),
        "succeeded": sum(1 for key in mine if successes[key]),
        "lost": len(lost),
        "lost_ids": [f"{sub}/{mid}" for sub, mid in lost[:20]],
        "strays": len({e.key for e in runs} - mine.keys()),  # runs of ids never published to it
        "duplicates": len(duplicates),
        "duplicate_causes": dict(Counter(causes.values())),
        "unexplained_duplicate_ids": [f"{sub}/{mid}" for (sub, mid), cause in causes.items() if cause == OTHER][:20],
        "rejected_by_tasks": len(rejected),
        "dead_lettered": len(copies),
        "dead_letter_copies": len(dead_letters),  # more than dead_lettered: a reject copied twice
        "dead_letter_matches_rejects": copies == rejected and all(d.subscription == path for d in dead_letters),
        "last_settled_s": round(max(settled_at, default=timeline.began) - timeline.began, 1),  # its tail, in the shared pool
        "fates": dict(Counter(p.fate for p in mine.values())),
    }


def duplicate_causes(duplicates: dict[Key, int], published: dict[Key, Published], runs: list[Entry], timeline: Timeline) -> dict[Key, str]:
    """Why each message succeeded more than once, judged by its first success: in a fault's window;
    else run by a worker that died right after (a sibling coroutine or batch member crashed it
    before the success was reported: a coroutine's result is sent once the loop is back in the
    worker's code); else a slow task; else OTHER."""
    first_success: dict[Key, Entry] = {}
    for entry in runs:
        if entry.mark is Mark.SUCCESS:
            first_success.setdefault(entry.key, entry)
    died_at = {d.pid: d.at for d in timeline.deaths}
    causes: dict[Key, str] = {}
    for key in duplicates:
        first = first_success[key]
        cause = next((w.cause for w in timeline.windows if w.start <= first.at <= w.end), None)
        if cause is None and 0 <= died_at.get(first.pid, -1.0) - first.at <= REPORT_GRACE:
            cause = "its worker died before reporting the success"
        if cause is None:
            cause = "slow task outlived a lease" if key in published and published[key].fate == "slow" else OTHER
        causes[key] = cause
    return causes


def totals(per_subscription: dict[str, dict[str, Any]], published: dict[Key, Published], shapes: Iterable[str]) -> dict[str, Any]:
    """The subscriptions' figures added up, under the names a one-subscription soak always had."""
    figures = per_subscription.values()
    causes: Counter[str] = Counter()
    for one in figures:
        causes.update(one["duplicate_causes"])
    return {
        **{key: sum(one[key] for one in figures) for key in ("published", "succeeded", "lost")},
        "lost_ids": [mid for one in figures for mid in one["lost_ids"]][:20],
        "strays": sum(one["strays"] for one in figures),
        "duplicates": sum(one["duplicates"] for one in figures),
        "duplicate_causes": dict(causes),
        "unexplained_duplicate_ids": [mid for one in figures for mid in one["unexplained_duplicate_ids"]][:20],
        **{key: sum(one[key] for one in figures) for key in ("rejected_by_tasks", "dead_lettered", "dead_letter_copies")},
        "dead_letter_matches_rejects": all(one["dead_letter_matches_rejects"] for one in figures),
        "fates": dict(Counter(p.fate for p in published.values())),
        "shapes": {shape: dict(Counter(p.fate for p in published.values() if p.shape == shape)) for shape in shapes},
    }


def worker_deaths(log: Path) -> list[Death]:
    """Workers that died (a `worker.exited` warning), from the daemons' log."""
    deaths = []
    for line in log.read_text(errors="replace").splitlines():
        if '"worker.exited"' in line:
            event = json.loads(line)
            if event.get("level") == "warning":
                at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
                deaths.append(Death(event["worker_pid"], at, _death_cause(event)))
    return deaths


def _death_cause(event: dict[str, Any]) -> str:
    """From the typed fields of a worker.exited event: why we killed it, else its exit code or signal."""
    if event.get("kill_reason") == "timeout":
        return "timeout (killed)"
    code = event.get("exit_code")
    if isinstance(code, int) and code < 0:
        return {-signal.SIGKILL: "SIGKILL", -signal.SIGSEGV: "segfault"}.get(code, f"signal {-code}")
    if isinstance(code, int):
        return f"exited with code {code}"
    return "other"
