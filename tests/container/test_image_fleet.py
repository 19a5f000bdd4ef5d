"""Three containers of the image on one subscription; one is killed outright mid-backlog.

The container version of the systemd fleet test (tests/system/test_fleet.py, bench/fleet.py), with
its ledger check: the survivors finish the killed container's messages once its leases lapse, and
no published message goes missing.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from bench.fleet import done_counts, tally
from tests.container.conftest import ACK_DEADLINE
from tests.container.runtime import wait_until
from tests.support.pubsub import Ledger

pytestmark = pytest.mark.container
HOSTS = 3
MESSAGES = 450


def test_a_fleet_of_three_shares_a_subscription_and_finishes_a_killed_containers_messages(containers, broker, topic_sub):
    topic, sub = topic_sub(ack_deadline=ACK_DEADLINE)
    fleet = [containers(sub, f"host{i}") for i in range(HOSTS)]
    for host in fleet:
        host.wait_ready(timeout=90)
    ledgers = [host.ledger for host in fleet]
    ids = broker.publish(topic, MESSAGES, data={"seconds": 0.2}, task="sleep")
    wait_until(lambda: len(done_counts(ledgers)) >= MESSAGES // 3, 90, f"{MESSAGES // 3} done before the kill")

    victim, survivors = fleet[0], fleet[1:]
    done_before = len(done_counts(ledgers))
    victim.kill()  # podman kill: SIGKILL to every process of the container, nothing drained or acked
    killed_at = time.monotonic()
    ledger = Ledger(victim.ledger.parent)
    cut_off = set(ledger.ids("start")) - set(ledger.ids("done"))
    finished = wait_until(lambda: set(ids) <= set(done_counts(ledgers)), 120, f"all {MESSAGES} done")

    with concurrent.futures.ThreadPoolExecutor(len(survivors)) as pool:
        stops = list(pool.map(lambda host: host.stop_timed(30), survivors))
    counts = done_counts(ledgers)
    verdict = tally(ids, counts)
    per_host = [len(done_counts([path])) for path in ledgers]
    print(
        f"\n[container] fleet of {HOSTS} on one subscription, host0 killed after {done_before} of {MESSAGES} "
        f"({len(cut_off)} cut off mid-task): lost {verdict['lost']}, duplicates {verdict['duplicates']}, "
        f"all done {finished - killed_at:.1f} s after the kill; done per host {per_host}; "
        f"survivors stopped in {', '.join(f'{s:.1f} s (exit {c})' for s, c in stops)}"
    )
    assert verdict["lost"] == 0
    assert all(n > 0 for n in per_host)  # every container took work
    assert cut_off <= set(done_counts(ledgers[1:]))  # the killed one's running tasks ran again elsewhere
    assert finished - killed_at < 60  # its leases lapsed (10 s) and the others ran them
    assert all(code == 0 for _, code in stops)
