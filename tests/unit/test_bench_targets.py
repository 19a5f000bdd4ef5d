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
