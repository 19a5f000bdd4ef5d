"""The Prometheus adapter knows nothing of the pool: the exit causes it starts at 0 are handed to it."""

from __future__ import annotations

import ast
import inspect

from consumerd.adapters import prometheus
from consumerd.adapters.prometheus import Metrics, MetricsSink, NullMetrics


def _exits(metrics: Metrics) -> list[str]:
    text = metrics.exposition().decode()
    return [line for line in text.splitlines() if line.startswith("consumerd_worker_exits_total")]


def test_the_given_exit_causes_exist_from_the_start_in_their_order():
    metrics = Metrics("1.0", lambda: ({}, {}), exit_causes=["timeout", "fatal", "exit_0", "exit_nonzero"])
    assert _exits(metrics) == []  # created with the task names, once they are known
    metrics.known_tasks(frozenset({"a"}))
    metrics.worker_exited("signal_SIGKILL")
    metrics.worker_exited("timeout")
    assert _exits(metrics) == [
        'consumerd_worker_exits_total{cause="timeout"} 1.0',
        'consumerd_worker_exits_total{cause="fatal"} 0.0',
        'consumerd_worker_exits_total{cause="exit_0"} 0.0',
        'consumerd_worker_exits_total{cause="exit_nonzero"} 0.0',
        'consumerd_worker_exits_total{cause="signal_SIGKILL"} 1.0',
    ]


def test_the_adapter_imports_nothing_of_the_pool():
    tree = ast.parse(inspect.getsource(prometheus))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.startswith(("consumerd.pool", "consumerd.supervisor"))}


def test_both_metrics_kinds_are_metrics_sinks():
    sinks: list[MetricsSink] = [Metrics("1.0", lambda: ({}, {}), exit_causes=()), NullMetrics()]
    for sink in sinks:
        sink.known_tasks(frozenset({"a"}))
        sink.outcome("a", "success")
        sink.worker_exited("exit_0")
