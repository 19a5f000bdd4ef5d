"""The short chaos soak (1,000 messages over two subscriptions of one daemon) inside `make test`;
`make chaos` runs 20,000. The soak runs once; each test reads its results."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from harness.daemon import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("chaos") / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "--messages", "1000", "--subscriptions", "2", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_chaos_soak_loses_nothing(soak: dict[str, Any]) -> None:
    result = soak
    assert result["lost"] == 0
    assert result["dead_letter_matches_rejects"] and result["rejected_by_tasks"] > 0
    assert result["orphaned_workers_left_after_sigkill"] == 0
    assert result["daemon_restarts"] == 3
    assert result["succeeded"] + result["rejected_by_tasks"] == result["published"]
    assert sum(result["worker_deaths"].values()) > 0, "the soak must actually have crashed workers"
    restart = result["emulator_restart"]
    assert {k: restart[k] for k in ("survived", "published", "resumed", "exit_code")} == {
        "survived": True,
        "published": 50,
        "resumed": 50,
        "exit_code": 0,
    }


def test_chaos_soak_accounts_for_each_subscription_in_itself(soak: dict[str, Any]) -> None:
    """Both subscriptions got messages (3:1, as their weights) and misbehaving ones; each message
    ran only in the subscription it was published to; in each nothing was lost, and its own
    dead-letter topic holds exactly its own rejects."""
    subscriptions = soak["subscriptions"]
    assert [(one["weight"], one["published"]) for one in subscriptions.values()] == [(3, 750), (1, 250)]
    assert soak["strays"] == 0
    for name, one in subscriptions.items():
        assert one["lost"] == 0 and one["strays"] == 0, (name, one)
        assert one["succeeded"] + one["rejected_by_tasks"] == one["published"], (name, one)
        assert one["dead_letter_matches_rejects"] and one["rejected_by_tasks"] > 0, (name, one)
        assert sum(n for fate, n in one["fates"].items() if fate not in ("ok", "reject")) > 0, (name, one["fates"])
    assert sum(one["duplicates"] for one in subscriptions.values()) == soak["duplicates"]
    assert soak["emulator_restart"]["resumed_by_subscription"] == dict.fromkeys(subscriptions, 25)
