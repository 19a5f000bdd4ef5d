from consumerd.policy.leases import LeaseSchedule


def test_nothing_due_until_renew_fraction_of_the_deadline():
    leases = LeaseSchedule(ack_deadline=60)
    leases.add("a", now=100.0, deadline=10)
    assert leases.next_due() == 106.0
    assert leases.due(105.9) == []
    assert leases.due(106.0) == ["a"]


def test_due_lease_renews_its_whole_cohort_in_one_batch():
    leases = LeaseSchedule(ack_deadline=60)
    leases.add("old", now=0.0, deadline=10)
    leases.add("middle", now=3.0, deadline=10)  # 30 % elapsed at t=6: joins the batch
    leases.add("new", now=5.0, deadline=10)  # 10 % elapsed: not yet
    assert sorted(leases.due(6.0)) == ["middle", "old"]


def test_renewal_uses_the_configured_deadline():
    leases = LeaseSchedule(ack_deadline=60)
    leases.add("a", now=0.0, deadline=10)
    leases.renewed(["a"], now=6.0)
    assert leases.next_due() == 6.0 + 36.0
    assert leases.due(41.9) == []
    assert leases.due(42.0) == ["a"]


def test_long_task_is_renewed_every_period_without_gaps():
    leases = LeaseSchedule(ack_deadline=10)
    leases.add("a", now=0.0, deadline=10)
    now, renewals = 0.0, []
    while now < 50.0:  # a task running 5x the deadline, ticking every 0.5 s
        due = leases.due(now)
        if due:
            leases.renewed(due, now)
            renewals.append(now)
        assert leases.expired(now) == []
        now += 0.5
    assert len(renewals) == 8 and renewals[0] == 6.0


def test_removed_and_unknown_leases_are_ignored():
    leases = LeaseSchedule(ack_deadline=10)
    leases.add("a", now=0.0, deadline=10)
    leases.remove("a")
    leases.remove("never-added")
    leases.renewed(["a"], now=1.0)
    assert len(leases) == 0 and leases.next_due() is None and leases.due(100.0) == []


def test_expired_after_deadline_without_renewal():
    leases = LeaseSchedule(ack_deadline=10)
    leases.add("a", now=0.0, deadline=10)
    assert leases.expired(9.99) == []
    assert leases.expired(10.0) == ["a"]


def test_fractions_are_validated():
    import pytest

    with pytest.raises(ValueError):
        LeaseSchedule(10, renew_fraction=0.5, batch_fraction=0.6)


def test_next_due_is_always_the_earliest_renewal_of_the_leases_held():
    """Checked against the minimum over every lease, through adds, removals (acks, mostly oldest
    first) and renewals with a changing deadline, at a fake clock."""
    import random

    rng = random.Random(3)
    leases = LeaseSchedule(ack_deadline=10)
    held: dict[str, tuple[float, float]] = {}  # ack id -> (extended at, deadline)
    now, serial = 0.0, 0
    for _ in range(5000):
        now += rng.random()
        op = rng.random()
        if op < 0.4:
            serial += 1
            deadline = rng.choice([10, 60])
            leases.add(f"a{serial}", now, deadline)
            held[f"a{serial}"] = (now, deadline)
        elif op < 0.8 and held:
            ack_id = next(iter(held)) if rng.random() < 0.8 else rng.choice(list(held))
            leases.remove(ack_id)
            del held[ack_id]
        elif held:
            leases.ack_deadline = rng.choice([10, 30])
            renewed = leases.due(now) or rng.sample(list(held), min(3, len(held)))
            leases.renewed(renewed, now)
            for ack_id in renewed:
                held[ack_id] = (now, leases.ack_deadline)
        expected = min((at + deadline * 0.6 for at, deadline in held.values()), default=None)
        assert leases.next_due() == expected
    assert serial > 1000


def test_acked_leases_below_a_long_lived_one_do_not_pile_up():
    """A task holding the earliest lease while thousands of others are acked: the schedule's
    memory stays proportional to the leases held, not to the messages seen."""
    leases = LeaseSchedule(ack_deadline=60)
    leases.add("long", 0.0, 60)
    for i in range(10_000):
        leases.add(f"a{i}", 1.0 + i / 1000, 60)
        leases.remove(f"a{i}")
        assert leases.next_due() == 36.0  # the long-lived lease stays the next renewal
    assert len(leases) == 1
    assert len(leases._heap) <= 2 * len(leases) + 64
