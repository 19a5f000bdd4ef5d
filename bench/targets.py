"""The targets `make bench` checks, from its records: each a measured figure against a bound.

A target that compares two runs (a share of the no-op ceiling, of the cores' ideal) compares them
within each repetition and takes the median of those ratios: the machine's speed and the emulator's
drift between repetitions, so a median of one and a median of the other may come from different
moments.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable


def _throughput(summary: list[dict], contender: str, workload: str) -> float:
    return next((s["throughput"] for s in summary if s["contender"] == contender and s["workload"] == workload), 0.0)


def _batch_median(summary: list[dict]) -> float:
    return next((s["batch_median"] or 0.0 for s in summary if s["workload"] == "batch" and s["contender"].startswith("consumerd")), 0.0)


def paired(records: list[dict], ratio: Callable[[list[dict]], float | None]) -> tuple[float, list[float]]:
    """The median over repetitions of ``ratio`` computed on one repetition's runs, in percent."""
    per_rep = []
    for rep in sorted({r["repetition"] for r in records}):
        value = ratio([r for r in records if r["repetition"] == rep])
        if value is not None:
            per_rep.append(round(value * 100, 1))
    return (statistics.median(per_rep) if per_rep else 0.0), per_rep


def _best_of(runs: list[dict], workload: str) -> float:
    """The best consumerd throughput on ``workload``, over runs or summary rows alike (same keys)."""
    return max((r["throughput"] for r in runs if r["contender"].startswith("consumerd") and r["workload"] == workload), default=0.0)


def _share_of_ceiling(workload: str) -> Callable[[list[dict]], float | None]:
    def ratio(runs: list[dict]) -> float | None:
        ceiling = _throughput(runs, "ceiling", "noop")
        return _best_of(runs, workload) / ceiling if ceiling else None

    return ratio


def _share_of_cores(contender: str, cores: int) -> Callable[[list[dict]], float | None]:
    def ratio(runs: list[dict]) -> float | None:
        run = next((r for r in runs if r["contender"] == contender and r["workload"] == "cpu20"), None)
        if run is None or not run.get("task_cpu_ms"):
            return None
        return run["throughput"] / (cores / (run["task_cpu_ms"] / 1000))  # ideal: cores / what a task cost in that run

    return ratio


def reload_target(reload: dict) -> tuple[str, float, float, str]:
    """A code reload under load leaves no gap in completions longer than one task."""
    task_ms = float(reload["task_ms"])
    return (f"code reload under load: longest gap in completions <= one task ({task_ms:.0f} ms)", reload["longest_gap_ms"], task_ms, "<=")


Target = tuple[str, float, float, str]  # (target, measured, bound, ">=" or "<=")


def fair_share_targets(fair: dict) -> list[Target]:
    """A flooded subscription beside a quiet one (weight 1 each): the quiet one's messages are not
    stuck behind the flood, and sharing the pool costs it at most a tenth of its throughput."""
    return [
        (
            f"two subscriptions, one flooded ({fair['flood']} x CPU 20 ms), one quiet ({fair['quiet']}): quiet p99 publish-to-done <= 1 s",
            fair["quiet_latency_ms"]["p99"],
            1000.0,
            "<=",
        ),
        ("two subscriptions: total throughput >= 90 % of one subscription's", fair["throughput"], 0.9 * fair["single_throughput"], ">="),
    ]


def weights_target(weights: dict) -> Target:
    """Completions of two flooded subscriptions while both had a backlog: within 10 % of their
    weights' ratio (a ratio of 2.7 to 3.3 for 3:1); one that got nothing is 100 % off."""
    (heavy_weight, light_weight), (heavy, light) = weights["weights"], weights["done"]
    off = abs(heavy / light / (heavy_weight / light_weight) - 1) * 100 if light else 100.0
    return (
        f"weights {heavy_weight}:{light_weight}, both flooded: % off {heavy_weight}:{light_weight} in completions ({heavy}:{light})",
        off,
        10.0,
        "<=",
    )


def memory_target(memory: dict) -> Target:
    """One daemon serving five subscriptions takes well under half the memory of five daemons."""
    return ("five subscriptions in one daemon (c=10): % of the PSS of five daemons (c=2 each)", memory["share_percent"], 40.0, "<=")


def rate_limit_targets(limit: dict) -> list[Target]:
    """A rate-limited task holds its rate, and the unlimited tasks beside it are not held up by it."""
    rate, steady = limit["rate_limit"], limit["limited_steady_rate"]
    return [
        (
            f"rate limit {rate:g}/s over {limit['limited']}: % off the limit, steady ({steady:.2f}/s)",
            abs(steady / rate - 1) * 100,
            5.0,
            "<=",
        ),
        (
            "rate limit: unlimited tasks beside it >= 90 % of their throughput alone",
            limit["unlimited_throughput"],
            0.9 * limit["unlimited_alone"],
            ">=",
        ),
    ]


def checked(rows: list[Target]) -> list[dict]:
    return [
        {
            "target": name,
            "measured": round(measured, 2),
            "bound": round(bound, 2),
            "met": measured >= bound if op == ">=" else measured <= bound,
        }
        for name, measured, bound, op in rows
    ]


def targets(
    summary: list[dict],
    scaling: list[dict],
    idle: dict,
    lease: dict,
    cores: int,
    records: list[dict],
    reload: dict | None = None,
    subscriptions: dict | None = None,
    rate_limit: dict | None = None,
) -> list[dict]:
    def best(workload: str) -> float:
        return _best_of(summary, workload)

    cpu_share, cpu_reps = paired(records, _share_of_cores(f"consumerd c={cores} mtpc=0", cores))
    noop_share, noop_reps = paired(records, _share_of_ceiling("noop"))
    batch_share, batch_reps = paired(records, _share_of_ceiling("batch"))

    ceiling = _throughput(summary, "ceiling", "noop")
    consumerd_rss = max((s["consumer_rss_mb"] or 0) for s in summary if s["contender"].startswith("consumerd"))
    rows = [  # (target, measured, bound, ">=" or "<=")
        ("CPU 20 ms: >= 1.8x subscribe()", best("cpu20"), 1.8 * _throughput(summary, "subscribe", "cpu20"), ">="),
        (f"CPU 20 ms, concurrency = cores: % of cores / task CPU time, median of {cpu_reps}", cpu_share, 95.0, ">="),
        ("heavy tail: >= 5x blog design", best("tail"), 5 * _throughput(summary, "blog", "tail"), ">="),
        (f"no-op: % of the ceiling in the same repetition, median of {noop_reps}", noop_share, 60.0, ">="),
        ("I/O 100 ms at 32: >= 90 % of min(320/s, ceiling)", best("io100"), 0.9 * min(320.0, ceiling or 320.0), ">="),
        (
            "metrics on: no-op >= 95 % of metrics off",
            _throughput(summary, f"consumerd c={cores} mtpc=0", "noop"),
            0.95 * _throughput(summary, f"consumerd c={cores} mtpc=0 metrics=off", "noop"),
            ">=",
        ),
        ("idle to busy: start p50 <= 100 ms", idle["start_latency_ms_p50"], 100.0, "<="),
        ("idle supervisor CPU < 1 % of a core", idle["idle_cpu_percent"], 1.0, "<="),
        ("supervisor RSS <= 80 MB", consumerd_rss, 80.0, "<="),
        ("lease renewal: modack RPCs <= renewal ticks", lease["modack_rpcs"], lease["renewal_ticks"], "<="),
        ("async I/O 100 ms, c=2 x 200 coroutines: >= 1,500 msg/s", best("aio100"), 1500.0, ">="),
        ("async I/O 100 ms: >= 10x subscribe()", best("aio100"), 10 * _throughput(summary, "subscribe", "aio100"), ">="),
        (f"batch of 500: % of the no-op ceiling in the same repetition, median of {batch_reps}", batch_share, 50.0, ">="),
        ("batch of 500: median batch full", _batch_median(summary), 500.0, ">="),
    ]
    if reload is not None:
        rows.append(reload_target(reload))
    if subscriptions is not None:
        rows += [
            *fair_share_targets(subscriptions["fair_share"]),
            weights_target(subscriptions["weights"]),
            memory_target(subscriptions["memory"]),
        ]
    if rate_limit is not None:
        rows += rate_limit_targets(rate_limit)
    for point in scaling:
        ideal = min(point["concurrency"] / 0.1, ceiling or 1e9)
        rows.append((f"scaling: c={point['concurrency']} >= 90 % of ideal", point["throughput"], 0.9 * ideal, ">="))
    return checked(rows)
