"""The short chaos soak (1,000 messages) inside `make test`; `make chaos` runs 20,000."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.daemon import REPO

pytestmark = pytest.mark.integration


def test_chaos_soak_loses_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "--messages", "1000", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["lost"] == 0
    assert result["dead_letter_matches_rejects"] and result["rejected_by_tasks"] > 0
    assert result["orphaned_workers_left_after_sigkill"] == 0
    assert result["daemon_restarts"] == 3
    assert result["succeeded"] + result["rejected_by_tasks"] == result["published"]
    assert sum(result["worker_deaths"].values()) > 0, "the soak must actually have crashed workers"
    assert result["emulator_restart"] == {"survived": True, "published": 50, "resumed": 50, "exit_code": 0}
