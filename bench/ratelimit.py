"""A rate-limited task beside unlimited ones in one subscription: what `python -m bench` measures of it.

The limited task (`bench_limited`, a no-op) runs under `[tasks] rate_limits = {bench_limited =
"50/s"}`; the unlimited ones are the bench's 100 ms sleeps at concurrency 4 x cores, first alone on
a subscription of their own, then interleaved evenly with the limited ones in one subscription.
Sleeps, not CPU tasks: their pace is the workers', not what other processes leave of the cores,
so the mix keeps both kinds supplied however busy the machine is. The proportion: while the others
run at their ideal, the limited messages arrive faster than their limit lets them start, by RESERVE
over the run (what the daemon holds waiting for tokens and still pulls past: `HELD_SECONDS` of the
rate). Fewer, and the limited task would run below its limit for want of messages whenever the
others ran a little slower; many more, and the daemon would have to hold them all or stop pulling,
so the others would wait behind them in the subscription (its order is the one thing no consumer
can overtake).
"""

from __future__ import annotations

from typing import Any

from bench.runner import ready_at
from bench.subscriptions import CpuUse, Scenarios, steady_rate
from consumerd.supervisor.throttle import HELD_SECONDS

RATE = 50.0  # messages per second of the limited task
BURST = int(RATE)  # the bucket starts full: one second's tokens
RESERVE = int(HELD_SECONDS * RATE)  # limited messages still waiting when the others are done
UNLIMITED = "sleep100"
UNLIMITED_SECONDS = 0.1


def interleave(limited: int, unlimited: int) -> list[bool]:
    """``limited + unlimited`` places in publishing order, True for a limited message, evenly spread."""
    total = limited + unlimited
    return [(i + 1) * limited // total > i * limited // total for i in range(total)]


def unlimited_count(limited: int, throughput: float) -> int:
    """How many unlimited messages go with ``limited`` ones so that, the unlimited running at
    ``throughput``, the limit lets all but RESERVE of the limited start by the time they are done."""
    return max(1, round(max(0, limited - BURST - RESERVE) / RATE * throughput))


def rate_after_burst(times: list[float], burst: int) -> float:
    """The steady rate of a limited task from its sorted start (here: end) ``times``: what started
    after the bucket's first ``burst`` per second from the first start to the last. Over the whole
    run, not a window: a pause in supply (the subscription's next messages were unlimited ones)
    leaves tokens that a later burst spends, which a window ending there would count as too fast,
    and one ending before it as too slow; the limiter promises only the long run."""
    if len(times) <= burst or times[-1] <= times[0]:
        return 0.0
    return (len(times) - burst) / (times[-1] - times[0])


def rate_limits(scenarios: Scenarios) -> dict[str, Any]:
    """The limited task's steady rate, and the unlimited ones' throughput beside it (while both
    still have messages) against theirs alone."""
    n, concurrency = scenarios.sizes.limited, 4 * scenarios.cores
    others = unlimited_count(n, concurrency / UNLIMITED_SECONDS)
    alone = _run(scenarios, [False] * others, concurrency)
    mixed = _run(scenarios, interleave(n, others), concurrency)
    result = {
        "rate_limit": RATE,
        "limited": n,
        "unlimited": others,
        "unlimited_task": UNLIMITED,
        "concurrency": concurrency,
        "limited_seconds": mixed["limited_seconds"],
        "limited_steady_rate": mixed["limited_rate"],
        "unlimited_throughput": mixed["unlimited_rate"],
        "unlimited_alone": alone["unlimited_rate"],
        "daemon_cores": {"alone": alone["daemon_cores"], "mixed": mixed["daemon_cores"]},
        "duplicates": mixed["duplicates"] + alone["duplicates"],
    }
    print(f"  rate limit {RATE:g}/s beside unlimited tasks: {result}", flush=True)
    return result


def _run(scenarios: Scenarios, limited: list[bool], concurrency: int) -> dict[str, Any]:
    """One daemon on one subscription of these messages (True: limited, in publishing order)."""
    topic, sub = scenarios.subscription()
    kinds = ["noop" if lim else UNLIMITED for lim in limited]
    ids = scenarios.publish(topic, kinds, ["bench_limited" if lim else "" for lim in limited])
    ledger = scenarios.ledger(f"rate-limit-{len(limited)}")
    daemon = scenarios.start(sub, concurrency, ledger, rate_limits={"bench_limited": f"{RATE:g}/s"})
    try:
        ready, use = ready_at(daemon), CpuUse([daemon.pid])
        rows = ledger.wait(ids, [daemon])
        cores = use.cores()
    finally:
        daemon.stop()
        scenarios.cleanup()
    limited_ends = sorted(rows[m].ended for m, lim in zip(ids, limited, strict=True) if lim)
    other_ends = sorted(rows[m].ended for m, lim in zip(ids, limited, strict=True) if not lim)
    until = min(limited_ends[-1], other_ends[-1]) if limited_ends else other_ends[-1]  # both kinds had messages until then
    return {
        "limited_seconds": round(limited_ends[-1] - ready, 2) if limited_ends else None,
        "limited_rate": round(rate_after_burst(limited_ends, BURST), 2),
        "unlimited_rate": round(steady_rate([t for t in other_ends if t <= until], skip=0), 2),
        **cores,
        "duplicates": ledger.duplicates,
    }


def lines(result: dict[str, Any]) -> list[str]:
    """The scenario's figures, for the bench's printed summary."""
    cores = result["daemon_cores"]
    return [
        f"rate limit {result['rate_limit']:g}/s on {result['limited']} no-ops beside {result['unlimited']} x {result['unlimited_task']} "
        f"(c={result['concurrency']}): {result['limited_steady_rate']:.2f}/s after the burst; the others "
        f"{result['unlimited_throughput']:.1f} msg/s beside it, {result['unlimited_alone']:.1f} alone "
        f"(daemon's cores {cores['mixed']:.2f}, {cores['alone']:.2f})"
    ]
