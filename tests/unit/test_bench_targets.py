"""The bench's paired targets: a ratio is taken within one repetition, then the median over them."""

from bench.targets import _share_of_ceiling, _share_of_cores, paired


def run(rep, contender, workload, throughput, task_cpu_ms=None):
    return {"repetition": rep, "contender": contender, "workload": workload, "throughput": throughput, "task_cpu_ms": task_cpu_ms}


def test_a_share_of_the_ceiling_pairs_runs_of_the_same_repetition():
    records = [
        run(0, "ceiling", "noop", 4000.0),
        run(0, "consumerd c=2 mtpc=0", "noop", 2400.0),
        run(0, "consumerd c=8 mtpc=0", "noop", 2000.0),
        run(1, "ceiling", "noop", 8000.0),
        run(1, "consumerd c=2 mtpc=0", "noop", 2800.0),
        run(2, "ceiling", "noop", 6000.0),
        run(2, "consumerd c=2 mtpc=0", "noop", 3600.0),
        run(2, "subscribe", "noop", 5000.0),  # not consumerd: never the best
    ]
    median, per_rep = paired(records, _share_of_ceiling("noop"))
    assert per_rep == [60.0, 35.0, 60.0]  # the best consumerd run of each repetition / its own ceiling
    assert median == 60.0


def test_a_share_of_the_cores_uses_what_the_tasks_cost_in_that_run():
    records = [
        run(0, "consumerd c=2 mtpc=0", "cpu20", 90.0, task_cpu_ms=20.0),  # ideal 100
        run(1, "consumerd c=2 mtpc=0", "cpu20", 72.0, task_cpu_ms=25.0),  # ideal 80
        run(2, "consumerd c=2 mtpc=0", "cpu20", 50.0),  # no CPU figure: left out
        run(2, "consumerd c=8 mtpc=0", "cpu20", 99.0, task_cpu_ms=20.0),  # another contender
    ]
    median, per_rep = paired(records, _share_of_cores("consumerd c=2 mtpc=0", cores=2))
    assert per_rep == [90.0, 90.0]
    assert median == 90.0


def test_the_reload_target_is_the_longest_gap_in_completions_around_a_reload_against_one_task():
    from bench.runner import longest_gap
    from bench.targets import reload_target

    ends = [10.0, 10.05, 10.1, 10.19, 10.2, 12.0]  # 12.0 is after the window
    assert round(longest_gap(ends, 10.0, 11.0), 3) == 0.09
    assert longest_gap(ends, 20.0, 21.0) == 0.0  # no completion there, no gap measured
    name, measured, bound, op = reload_target({"task_ms": 100, "longest_gap_ms": 54.8})
    assert (measured, bound, op) == (54.8, 100.0, "<=") and "one task (100 ms)" in name


# -- several subscriptions and rate limits ---------------------------------------------------------
def verdicts(rows):
    from bench.targets import checked

    return [t["met"] for t in checked(rows)]


def fair_share(quiet_p99, throughput, single=100.0):
    return {
        "flood": 1000,
        "quiet": 40,
        "quiet_latency_ms": {"p50": 80.0, "p99": quiet_p99},
        "throughput": throughput,
        "single_throughput": single,
    }


def test_the_quiet_subscription_must_finish_within_a_second_and_the_pool_keep_its_throughput():
    from bench.targets import fair_share_targets

    assert verdicts(fair_share_targets(fair_share(quiet_p99=240.0, throughput=95.0))) == [True, True]
    assert verdicts(fair_share_targets(fair_share(quiet_p99=999.0, throughput=90.5))) == [True, True]
    assert verdicts(fair_share_targets(fair_share(quiet_p99=1400.0, throughput=89.9))) == [False, False]


def test_weighted_completions_are_within_ten_percent_of_the_weights_ratio():
    from bench.targets import weights_target

    def target(heavy, light):
        return weights_target({"weights": [3, 1], "done": [heavy, light]})

    name, measured, bound, op = target(300, 100)
    assert (measured, bound, op) == (0.0, 10.0, "<=") and "(300:100)" in name
    assert verdicts([target(300, 110), target(325, 100)]) == [True, True]  # 2.73 and 3.25: inside
    assert verdicts([target(300, 112), target(340, 100)]) == [False, False]  # 2.68 and 3.4: outside
    assert target(450, 0)[1] == 100.0  # the light one starved: as far off as it gets, and missed


def test_one_daemon_for_five_subscriptions_must_take_under_forty_percent_of_five_daemons_memory():
    from bench.subscriptions import pss_kb
    from bench.targets import memory_target

    assert verdicts([memory_target({"share_percent": 27.1}), memory_target({"share_percent": 40.5})]) == [True, False]
    assert pss_kb(2**22 + 1) == 0  # no such process: nothing to count


def test_a_rate_limit_is_held_within_five_percent_and_does_not_slow_the_unlimited_tasks():
    from bench.targets import rate_limit_targets

    def limit(steady, unlimited):
        return {
            "rate_limit": 50.0,
            "limited": 300,
            "limited_steady_rate": steady,
            "unlimited_throughput": unlimited,
            "unlimited_alone": 80.0,
        }

    assert verdicts(rate_limit_targets(limit(steady=51.2, unlimited=76.0))) == [True, True]
    assert verdicts(rate_limit_targets(limit(steady=47.4, unlimited=71.9))) == [False, False]  # 5.2 % under; 89.9 %
    assert verdicts(rate_limit_targets(limit(steady=52.6, unlimited=90.0))) == [False, True]  # over the limit is off too


def test_completions_are_counted_until_the_first_subscription_ran_dry():
    from bench.subscriptions import Row, completions_while_backlogged

    rows = {f"a{i}": Row(0.0, 1.0 + i, 0.02) for i in range(6)} | {f"b{i}": Row(0.0, 1.5 + 3 * i, 0.02) for i in range(3)}
    heavy, light = [f"a{i}" for i in range(6)], [f"b{i}" for i in range(4)]  # b3 never finished: b had a backlog
    assert completions_while_backlogged(rows, [heavy, light]) == [6, 2]  # a's last ended at 6.0; b's at 1.5 and 4.5


def test_rate_limit_figures_from_the_ledger():
    from bench.ratelimit import BURST, RATE, RESERVE, interleave, rate_after_burst, unlimited_count
    from bench.subscriptions import steady_rate

    pattern = interleave(3, 9)
    assert pattern.count(True) == 3 and pattern == [False, False, False, True] * 3  # spread evenly
    assert interleave(2, 0) == [True, True]
    assert unlimited_count(int(BURST + RESERVE + 5 * RATE), throughput=80.0) == 400  # five seconds of the limit, the others at 80/s
    assert steady_rate([0.0, 0.1, 0.2, 1.0, 1.5, 2.0], skip=3) == 2.0
    burst_then_steady = [0.0] * 50 + [0.02 * (i + 1) for i in range(250)]  # 50 at once, then one per 20 ms
    assert round(rate_after_burst(burst_then_steady, burst=50), 6) == 50.0
    # No supply from 1 s to 2 s: the second's tokens go at once when messages come again.
    paused = [0.0] * 50 + [0.02 * (i + 1) for i in range(50)] + [2.0] * 50 + [2.0 + 0.02 * (i + 1) for i in range(100)]
    assert round(rate_after_burst(paused, burst=50), 6) == 50.0  # over the run: the limit held
    assert round(steady_rate(paused, skip=100), 1) == 74.5  # a window from the pause on would say 49 % too fast
    assert rate_after_burst([1.0] * 10, burst=50) == 0.0
    assert steady_rate([1.0], skip=0) == 0.0
