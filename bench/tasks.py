"""The workloads, shared by every contender so they all run exactly the same code per message.

Each message carries `kind` (what to do) and each run appends `message_id publish_ts end_ts pid` to
the file named by BENCH_OUT, from which the harness computes throughput and latency for everyone
alike. CPU work is a fixed number of loop iterations calibrated once per run (BENCH_ITERS_PER_MS),
so a task that shares a core takes longer instead of quietly doing less.
"""

from __future__ import annotations

import asyncio
import os
import time

from consumerd import Message, task

WORKLOADS = {
    # name: (list of kinds cycled over the messages, description)
    "noop": (["noop"], "no-op"),
    "cpu20": (["cpu20"], "CPU-bound, 20 ms of pure Python"),
    "tail": (["cpu10"] * 9 + ["sleep1000"], "heavy tail: 90 % 10 ms CPU, 10 % 1 s sleep"),
    "io100": (["sleep100"], "I/O-bound, 100 ms sleep"),
    # The reload scenario: lengths that differ keep the workers out of step, so a gap in completions
    # is the reload's, not a backlog of equal tasks ending all at once every 100 ms.
    "io_mixed": (["sleep50", "sleep125", "sleep75", "sleep150", "sleep100"], "I/O-bound, 50-150 ms sleeps (100 ms on average)"),
    "aio100": (["sleep100"], "I/O-bound, 100 ms sleep; consumerd runs it as an async def task"),
    "batch": (["noop"], "no-op; consumerd runs it as a batch task, 500 messages per call"),
}


def burn(ms: float) -> int:
    acc = 0
    for i in range(int(ms * float(os.environ.get("BENCH_ITERS_PER_MS", "20000")))):
        acc = (acc + i * i) % 1_000_003
    return acc


def calibrate() -> float:
    """Loop iterations per millisecond of CPU on this machine, now: the best of five 200 ms samples
    (the least disturbed), so a 20 ms task is at least 20 ms of CPU."""
    os.environ["BENCH_ITERS_PER_MS"] = "20000"
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        burn(200)
        best = min(best, time.process_time() - start)
    return 20000 * 200 / (best * 1000)


def work(kind: str) -> float:
    """Run the workload; return the CPU seconds this thread spent on it (0 for sleeps and no-ops).

    The machine's speed drifts between the calibration and a run (a shared VM), so the CPU targets
    take their ideal from what the tasks really cost, not from the nominal 20 ms."""
    if kind.startswith("cpu"):
        start = time.thread_time()
        burn(float(kind[3:]))
        return time.thread_time() - start
    if kind.startswith("sleep"):
        time.sleep(float(kind[5:]) / 1000)
    return 0.0


def record(message_id: str, publish_ts: float, cpu_s: float = 0.0) -> None:
    line = f"{message_id} {publish_ts:.6f} {time.time():.6f} {os.getpid()} {cpu_s:.6f}\n".encode()
    fd = os.open(os.environ["BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@task("bench")
def bench(msg: Message) -> None:
    cpu_s = work(msg.attributes["kind"])
    record(msg.message_id, msg.publish_time.timestamp() if msg.publish_time else 0.0, cpu_s)


@task("bench_limited")
def bench_limited(msg: Message) -> None:
    """The bench task under a name of its own, so a rate limit can apply to it alone (bench/ratelimit.py)."""
    bench(msg)


@task("bench_async")
async def bench_async(msg: Message) -> None:
    kind = msg.attributes["kind"]
    if kind.startswith("sleep"):
        await asyncio.sleep(float(kind[5:]) / 1000)
    else:
        work(kind)
    record(msg.message_id, msg.publish_time.timestamp() if msg.publish_time else 0.0)


@task("bench_batch", batch_size=500, batch_wait=1.0)
def bench_batch(msgs: list[Message]) -> None:
    for msg in msgs:
        work(msg.attributes["kind"])
    now = time.time()
    lines = "".join(f"{m.message_id} {m.publish_time.timestamp() if m.publish_time else 0.0:.6f} {now:.6f} {os.getpid()}\n" for m in msgs)
    fd = os.open(os.environ["BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines.encode())  # one write per batch: lines never interleave
    finally:
        os.close(fd)
    with open(os.environ["BENCH_OUT"] + ".batches", "a") as sizes:
        sizes.write(f"{len(msgs)}\n")
