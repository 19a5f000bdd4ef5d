"""The short fleet run inside `make test`: two hosts (systemd guests with the .deb) on one
subscription, one killed outright mid-backlog. `make fleet` runs three hosts and the throughput."""

from __future__ import annotations

import pytest

from bench.fleet import Fleet, deb

pytestmark = pytest.mark.system


def test_two_hosts_share_a_subscription_and_the_survivor_finishes_a_killed_hosts_messages(emulator, tmp_path):
    from tests.system.conftest import _cannot_boot

    if reason := _cannot_boot():
        pytest.skip(reason)
    fleet = Fleet(emulator.host, tmp_path, hosts=2)
    try:
        fleet.boot(deb())
        kill = fleet.kill_one(150)
    finally:
        fleet.teardown()
    assert kill["lost"] == 0
    assert kill["done_before_kill"] >= 50 and all(n > 0 for n in kill["done_per_host"])  # both hosts took work
    assert kill["finished_s_after_kill"] < 60  # its leases lapsed (10 s) and the survivor ran them
