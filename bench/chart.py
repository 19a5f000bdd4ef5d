"""The PNG the benchmarks page of the docs shows: throughput per contender per workload, and consumerd's scaling curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

WORKLOAD_TITLES = {"noop": "no-op", "cpu20": "CPU 20 ms", "tail": "heavy tail", "io100": "I/O 100 ms"}


def draw(result: dict, path: Path) -> Path:
    summary = result["summary"]
    workloads = [w for w in WORKLOAD_TITLES if any(s["workload"] == w for s in summary)]
    fig, grid = plt.subplots(2, 3, figsize=(18, 9))
    axes = list(grid.flat)
    for ax in axes[len(workloads) + 1 :]:
        ax.axis("off")
    for ax, workload in zip(axes, workloads, strict=False):
        rows = sorted((s for s in summary if s["workload"] == workload), key=lambda s: s["throughput"])
        names = [s["contender"] for s in rows]
        values = [s["throughput"] for s in rows]
        errors = [[s["throughput"] - s["throughput_min"] for s in rows], [s["throughput_max"] - s["throughput"] for s in rows]]
        colors = ["tab:blue" if n.startswith("consumerd") else "tab:gray" for n in names]
        ax.barh(names, values, xerr=errors, color=colors)
        ax.set_title(f"{WORKLOAD_TITLES[workload]} (messages/s)")
        ax.tick_params(axis="y", labelsize=8)
    scaling = result["scaling"]
    ax = axes[len(workloads)]
    c = [p["concurrency"] for p in scaling]
    ax.plot(c, [p["throughput"] for p in scaling], "o-", label="consumerd")
    ax.plot(c, [p["ideal"] for p in scaling], "--", color="gray", label="ideal (c / 0.1 s)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency")
    ax.set_title("consumerd, 100 ms sleep tasks: msg/s vs concurrency")
    ax.legend()
    cores = result["machine"]["cores"]
    fig.suptitle(
        f"consumerd vs alternatives, {cores} cores shared with the Pub/Sub emulator ({result['repetitions']} repetitions, median, min-max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
