"""Workers' memory against the real daemon and emulator: leaks recycle workers, a runaway allocation
fails only its own task, and under memory pressure the kernel would pick a worker, not the supervisor."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest

from harness.procinfo import status_kb

pytestmark = pytest.mark.integration

MODULES = {"modules": ["tests.support.memory_tasks"]}
SUPERVISOR_RSS_TOLERANCE_KB = 16 * 1024  # what pulling, logging and settling ~20 messages may add; the 2 GiB would be 2,097,152


def exits_by_cause(daemon, cause: str) -> float:
    [listening] = daemon.wait_for("metrics.listening")
    text = urllib.request.urlopen(f"http://{listening['address']}/metrics", timeout=5).read().decode()
    found = re.search(rf'^consumerd_worker_exits_total\{{cause="{cause}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def test_a_leaking_task_recycles_workers_and_every_message_succeeds_once(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    ids = broker.publish(topic, 20, data={"mb": 50}, task="leak")
    daemon = make_daemon(sub, workers={"concurrency": 2, "max_memory_per_child": "200MiB"}, tasks=MODULES)
    done = daemon.wait_for_ids("message.done", set(ids), timeout=120)
    retired = daemon.select("worker.memory_retired")
    pids = {int(parts[3]) for parts in ledger.lines() if parts[0] == "done"}
    peak_mb = max(int(parts[0].split("=")[1]) for parts in ledger.lines() if parts[0].startswith("rss_mb="))
    # 50 MiB a call over a ~25 MiB worker: above 200 MiB after its 4th call (a 5th may be queued behind
    # it already), so 20 calls need at least 4 workers, and all but the last retire.
    assert len(retired) >= 3 and len(pids) >= 4, (len(retired), pids)
    assert {e["reason"] for e in retired} == {"rss"} and all(e["rss"] > 200 * 2**20 for e in retired)
    assert peak_mb < 200 + 3 * 50  # it retired after the call that crossed the limit (plus what it already held)
    assert sorted(ledger.ids("start")) == sorted(ids) and all(e["attempt"] == 1 for e in done)  # none interrupted, none ran twice
    assert not daemon.select("message.failed") and not daemon.select("worker.exited", lost=1)
    deadline = time.monotonic() + 10
    while exits_by_cause(daemon, "max_memory") < len(retired):
        assert time.monotonic() < deadline, "worker exits were not counted as max_memory"
        time.sleep(0.2)
    assert exits_by_cause(daemon, "exit_0") == 0


def test_a_2_gib_allocation_under_memory_limit_fails_that_task_only_and_is_retried(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    daemon = make_daemon(
        sub, workers={"concurrency": 1, "memory_limit": "500MiB"}, retry={"min_backoff": 0.5, "max_backoff": 1}, tasks=MODULES
    )
    daemon.wait_ready()
    warm = broker.publish(topic, 5, data={"mb": 1}, task="leak")  # the supervisor's first pull, settle, ack
    daemon.wait_for_ids("message.done", set(warm), timeout=30)
    [worker] = daemon.workers()
    supervisor_before = status_kb(daemon.pid, "VmRSS")
    assert supervisor_before is not None
    [big] = broker.publish(topic, data={"gb": 2}, task="allocate_once")
    others = broker.publish(topic, 10, data={"mb": 1}, task="leak")
    [failed] = daemon.wait_for("message.failed", message_id=big, timeout=30)
    assert failed["outcome"] == "error" and failed["error"].startswith("MemoryError") and failed["retry_in_s"] <= 1
    [done] = daemon.wait_for("message.done", message_id=big, timeout=30)
    daemon.wait_for_ids("message.done", set(others), timeout=30)
    assert done["attempt"] == 2 and [p[0] for p in ledger.lines() if p[1] == big] == ["start", "start", f"allocated={10 * 2**20}", "done"]
    assert {int(p[3]) for p in ledger.lines() if p[1] in {big, *others}} == {worker}  # the same worker ran on: it stayed usable
    assert not [e for e in daemon.select("message.failed") if e["message_id"] != big]
    supervisor_after = status_kb(daemon.pid, "VmRSS")
    assert supervisor_after is not None and abs(supervisor_after - supervisor_before) < SUPERVISOR_RSS_TOLERANCE_KB, (
        supervisor_before,
        supervisor_after,
    )
    limits = Path(f"/proc/{worker}/limits").read_text()
    assert re.search(r"Max data size\s+524288000\s+524288000\s+bytes", limits), limits


def test_workers_raise_their_oom_score_above_the_supervisors(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    daemon = make_daemon(sub)
    daemon.wait_ready()
    workers = daemon.workers()
    assert len(workers) == 2
    supervisor = oom_score_adj(daemon.pid)
    assert {oom_score_adj(pid) for pid in workers} == {min(1000, supervisor + 500)}
    fork_server = {parent for parent in (int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in workers)}
    assert {oom_score_adj(pid) for pid in fork_server} == {supervisor}  # it forks the replacements: as safe as the supervisor
