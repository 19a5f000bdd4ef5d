"""Instances that coexist on one host (issue 19): with the built-in metrics address, a second daemon
starts on a free loopback port and both are named in their file_sd target files; an address set in
the file or the environment stays strict."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import consumerd
from harness.daemon import REPO, Daemon, daemon_env
from tests.support.pubsub import toml

pytestmark = pytest.mark.integration
DEFAULT = "127.0.0.1:9464"


def only_subscription(tmp_path: Path, name: str, subscription: str, **extra: dict) -> Path:
    """A config that sets its subscription and nothing about metrics (the tasks are the tests')."""
    path = tmp_path / f"{name}.toml"
    path.write_text(toml({"pubsub": {"subscription": subscription}, "tasks": {"modules": ["tests.support.tasks"]}, **extra}))
    return path


def default_metrics_env(emulator_host: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = daemon_env(emulator_host, tmp_path, CONSUMERD_LOGGING__FORMAT="json", CONSUMERD_WORKERS__CONCURRENCY="1")
    env.pop("CONSUMERD_METRICS__LISTEN", None)  # the harness's port 0: these daemons use the built-in default
    return {**env, **extra}


def run_until_exit(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumerd", "run", "--config", str(config)], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )


def assert_busy(result: subprocess.CompletedProcess[str], address: str) -> None:
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip().splitlines() == [
        f'consumerd: config error: metrics.listen: cannot listen on {address}: Address already in use (choose another port, or "" to turn it off)'
    ]
    assert '"daemon.ready"' not in result.stdout


def test_two_daemons_on_the_default_address_both_start_and_each_is_in_its_file_sd_entry(emulator, topic_sub, tmp_path):
    sd = tmp_path / "sd"
    sd.mkdir()
    names, daemons, subscriptions = ("thumbnails", "emails"), [], []
    try:
        for name in names:
            _, sub = topic_sub()
            subscriptions.append(sub)
            env = default_metrics_env(emulator.host, tmp_path, CONSUMERD_METRICS__FILE_SD=str(sd / f"{name}.json"))
            daemons.append(Daemon(only_subscription(tmp_path, name, sub), env).start())
            daemons[-1].wait_ready()  # one after the other: the first gets 9464, unless something else on this host has it
        first, second = (d.wait_for("metrics.listening")[0] for d in daemons)
        assert first["requested"] == second["requested"] == DEFAULT
        # Both asked for 9464 and serve on different addresses: at least one fell back. Which one is
        # not fixed: a system test's guest shares this loopback, and its daemon may hold 9464 for a while.
        assert second["address"] != first["address"]
        for name, sub, event in zip(names, subscriptions, (first, second)):
            exposition = urllib.request.urlopen(f"http://{event['address']}/metrics", timeout=5).read().decode()
            assert f'consumerd_build_info{{version="{consumerd.__version__}"}} 1.0' in exposition
            assert event["file_sd"] == str(sd / f"{name}.json")
            assert json.loads((sd / f"{name}.json").read_text()) == [
                {"targets": [event["address"]], "labels": {"subscriptions": sub.rpartition("/")[2]}}
            ]
        # The first daemon's address, named in the environment (the default's own value when it got
        # 9464): an operator's choice, so a taken port is still exit 78, not a fallback.
        explicit = default_metrics_env(emulator.host, tmp_path, CONSUMERD_METRICS__LISTEN=first["address"])
        assert_busy(run_until_exit(only_subscription(tmp_path, "explicit", subscriptions[0]), explicit), first["address"])
    finally:
        stopped = [d.stop() for d in daemons]
    assert [event and event["exit_code"] for event in stopped] == [0, 0], stopped
    assert sorted(p.name for p in sd.iterdir()) == []  # a clean stop takes each entry away


def test_an_address_set_in_the_file_that_is_taken_exits_78(emulator, topic_sub, tmp_path):
    _, sub = topic_sub()
    with socket.create_server(("127.0.0.1", 0)) as holder:
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        config = only_subscription(tmp_path, "strict", sub, metrics={"listen": address})
        assert_busy(run_until_exit(config, default_metrics_env(emulator.host, tmp_path)), address)
