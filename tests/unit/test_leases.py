from consumerd.leases import LeaseSchedule


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
