"""The benchmark harness: `python -m bench [--quick]` (what `make bench` / `make bench-quick` run).

One invocation starts its own emulator, and for every contender x workload publishes the same
backlog to a fresh topic, runs the contender until every message is done, and measures it. The
order of runs alternates between repetitions; figures are medians with min-max over repetitions.
The emulator's JIT is warmed first by a run that is not counted (a cold emulator ran the first
no-op ceiling at 3,440 msg/s and a later one at 8,241). A target that compares two runs (a share of
the ceiling, of the cores' ideal) compares them within each repetition and takes the median of the
ratios: the machine's speed drifts between repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench import ratelimit, subscriptions
from bench.runner import Run, Runner
from bench.targets import targets
from bench.tasks import calibrate
from consumerd.testing.emulator import Emulator

RESULTS = Path(__file__).resolve().parent / "results"


def plan(quick: bool, cores: int) -> list[Run]:
    """Every contender x workload run, with its message count."""
    n = (
        {"noop": 2000, "cpu20": 200, "tail": 150, "io100": 640, "aio100": 2000, "batch": 5000}
        if quick
        else {"noop": 5000, "cpu20": 600, "tail": 400, "io100": 1600, "aio100": 5000, "batch": 20000}
    )
    runs = [Run("ceiling", "noop", n["noop"])]
    for workload in ("noop", "cpu20", "tail"):
        runs += [Run("subscribe", workload, n[workload]), Run("blog", workload, n[workload])]
        for concurrency in (cores, 4 * cores):
            for mtpc in (0, 1):
                if quick and mtpc == 1 and workload != "noop":
                    continue
                runs.append(Run("consumerd", workload, n[workload], concurrency, mtpc))
    runs.append(Run("consumerd", "noop", n["noop"], cores, 0, metrics=False))  # the cost of metrics: on vs off
    runs += [Run("subscribe", "io100", n["io100"]), Run("blog", "io100", n["io100"])]
    runs += [Run("consumerd", "io100", n["io100"], 32, mtpc) for mtpc in ((0,) if quick else (0, 1))]
    # Task shapes: 100 ms I/O as `async def` (2 workers x 200 coroutines) against subscribe() on the
    # same sleep; and a no-op batch task (500 per call) against the no-op ceiling.
    runs += [
        Run("subscribe", "aio100", n["aio100"] // 5),
        Run("consumerd", "aio100", n["aio100"], 2, task="bench_async", async_concurrency=200),
    ]
    runs.append(Run("consumerd", "batch", n["batch"], cores, task="bench_batch"))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repetition, smaller backlogs (< 3 minutes)")
    parser.add_argument("--repetitions", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()
    reps = args.repetitions or (1 if args.quick else 3)
    cores = os.cpu_count() or 1
    iters = calibrate()
    os.environ["BENCH_ITERS_PER_MS"] = str(int(iters))
    started = time.time()
    with Emulator(java_heap="2g") as emulator:
        runner = Runner(emulator.host)
        runs = plan(args.quick, cores)
        warm = runner.measure(runs[0])
        print(f"  (warm-up, not counted) {_line(warm).strip()}", flush=True)
        records = []
        for rep in range(reps):
            for run in runs if rep % 2 == 0 else list(reversed(runs)):
                record = runner.measure(run)
                record["repetition"] = rep
                records.append(record)
                print(_line(record), flush=True)
        scaling = runner.scaling([1, 2, 4, 8, 16, 32, 64], quick=args.quick)
        idle = runner.idle_to_busy(cores)
        lease = runner.lease_renewals()
        reload = runner.code_reload(4 * cores, quick=args.quick)
        scenarios = subscriptions.Scenarios(emulator.host, cores, quick=args.quick)
        streams = scenarios.run()
        limit = ratelimit.rate_limits(scenarios)
    summary = summarize(records)
    result = {
        "machine": {"cores": cores, "python": sys.version.split()[0], "iters_per_ms": int(iters)},
        "quick": args.quick,
        "repetitions": reps,
        "seconds": round(time.time() - started, 1),
        "summary": summary,
        "runs": records,
        "scaling": scaling,
        "idle_to_busy": idle,
        "lease_renewal": lease,
        "code_reload": reload,
        "subscriptions": streams,
        "rate_limit": limit,
    }
    result["targets"] = targets(summary, scaling, idle, lease, cores, records, reload, streams, limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    from bench.chart import draw

    png = draw(result, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {png}")
    return 0


def _line(r: dict) -> str:
    return (
        f"  {r['contender']:<24} {r['workload']:<6} n={r['n']:<6} {r['throughput']:>8.1f} msg/s  "
        f"p50 {r['latency_ms']['p50']:>8.0f} ms  p99 {r['latency_ms']['p99']:>8.0f} ms"
    )


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["contender"], r["workload"]), []).append(r)
    out = []
    for (contender, workload), rs in groups.items():
        tp = [r["throughput"] for r in rs]
        out.append(
            {
                "contender": contender,
                "workload": workload,
                "n": rs[0]["n"],
                "throughput": statistics.median(tp),
                "throughput_min": min(tp),
                "throughput_max": max(tp),
                "latency_ms_p50": statistics.median(r["latency_ms"]["p50"] for r in rs),
                "latency_ms_p99": statistics.median(r["latency_ms"]["p99"] for r in rs),
                "consumer_cpu_s_per_1k": _median_of(rs, "consumer_cpu_s_per_1k"),
                "consumer_rss_mb": _median_of(rs, "consumer_rss_mb"),
                "worker_rss_mb": _median_of(rs, "worker_rss_mb"),
                "rpcs_per_1k": rs[0].get("rpcs_per_1k"),
                "duplicates": sum(r["duplicates"] for r in rs),
                "total_rss_mb": _median_of(rs, "total_rss_mb") or _median_of(rs, "consumer_rss_mb"),
                "batch_median": _median_of(rs, "batch_median"),
                "task_cpu_ms": _median_of(rs, "task_cpu_ms"),
            }
        )
    return out


def _median_of(rs: list[dict], key: str) -> float | None:
    values = [r[key] for r in rs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def print_table(result: dict) -> None:
    print("\ncontender                 workload     msg/s (min-max)          p50 ms    p99 ms  cpu s/1k  rss MB  worker MB")
    for s in sorted(result["summary"], key=lambda s: (s["workload"], -s["throughput"])):
        print(
            f"{s['contender']:<25} {s['workload']:<7} {s['throughput']:>9.1f} ({s['throughput_min']:.0f}-{s['throughput_max']:.0f})"
            f"{'':<6}{s['latency_ms_p50']:>9.0f} {s['latency_ms_p99']:>9.0f} {s['consumer_cpu_s_per_1k'] or 0:>9.2f}"
            f" {s['consumer_rss_mb'] or 0:>7.1f} {s['worker_rss_mb'] or 0:>9.1f}"
        )
    print(
        "\nscaling (consumerd, 100 ms sleep tasks):", ", ".join(f"c={p['concurrency']}: {p['throughput']:.0f}/s" for p in result["scaling"])
    )
    idle = result["idle_to_busy"]
    print(
        f"idle to busy: start p50 {idle['start_latency_ms_p50']:.0f} ms, p99 {idle['start_latency_ms_p99']:.0f} ms; idle CPU {idle['idle_cpu_percent']:.2f} % of a core"
    )
    reload = result["code_reload"]
    print(
        f"code reload under load (c={reload['concurrency']}, 50-150 ms tasks): new code served "
        f"{', '.join(str(r['ready_s']) for r in reload['reloads'])} s after SIGHUP; longest gap in completions "
        f"{reload['longest_gap_ms']:.0f} ms (steady state {reload['steady_longest_gap_ms']:.0f} ms)"
    )
    for line in [*subscriptions.lines(result["subscriptions"]), *ratelimit.lines(result["rate_limit"])]:
        print(line)
    print("\nRSS, supervisor + workers (consumerd) or the whole process (others), MB:")
    for s in sorted(result["summary"], key=lambda s: (s["workload"], s["contender"])):
        if s["workload"] in ("aio100", "io100"):
            print(f"  {s['contender']:<32} {s['workload']:<7} {s['total_rss_mb'] or 0:>7.1f}")
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: measured {t['measured']}, bound {t['bound']}")


if __name__ == "__main__":
    sys.exit(main())
