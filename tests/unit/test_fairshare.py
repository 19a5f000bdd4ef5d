"""The weighted fair share of the pool between subscriptions (pure, simulated)."""

from __future__ import annotations

import collections

from consumerd.policy.fairshare import Share, next_turn


def simulate(shares: dict[str, Share], arrivals: dict[str, int], slots: int, steps: int, duration: int = 10) -> collections.Counter[str]:
    """``slots`` workers; each message runs ``duration`` steps; ``arrivals`` messages of each
    subscription arrive per step (a flood: more than the pool takes). Returns completions."""
    waiting = collections.Counter[str]()
    running: list[tuple[int, str]] = []  # (ends at, subscription)
    done = collections.Counter[str]()
    for step in range(steps):
        for name, n in arrivals.items():
            waiting[name] += n
        for end, name in [r for r in running if r[0] <= step]:
            running.remove((end, name))
            shares[name].running -= 1
            done[name] += 1
        while len(running) < slots and (name := next_turn(shares, {n for n, c in waiting.items() if c})) is not None:
            waiting[name] -= 1
            shares[name].running += 1
            shares[name].served_at = step
            running.append((step + duration, name))
    return done


def test_weights_three_to_one_share_a_flooded_pool_three_to_one():
    shares = {"orders": Share(3), "emails": Share(1)}
    done = simulate(shares, {"orders": 5, "emails": 5}, slots=8, steps=2000)
    assert abs(done["orders"] / done["emails"] - 3.0) < 0.1


def test_equal_weights_alternate_and_an_idle_subscription_lends_its_share():
    shares = {"a": Share(1), "b": Share(1)}
    done = simulate(shares, {"a": 5, "b": 5}, slots=4, steps=1000)
    assert abs(done["a"] - done["b"]) <= 4
    shares = {"a": Share(1), "b": Share(1)}
    done = simulate(shares, {"a": 5}, slots=4, steps=1000)  # b is idle: a gets every worker
    assert done["a"] >= 4 * (1000 // 10) - 4 and done["b"] == 0


def test_a_quiet_subscription_is_served_before_a_flooded_one_whatever_its_backlog():
    shares = {"flood": Share(1, running=7), "quiet": Share(1, running=0)}
    assert next_turn(shares, {"flood", "quiet"}) == "quiet"
    shares = {"flood": Share(1, running=3), "quiet": Share(1, running=3)}
    shares["flood"].served_at, shares["quiet"].served_at = 10, 9
    assert next_turn(shares, {"flood", "quiet"}) == "quiet"  # a tie: the one served least recently


def test_max_concurrency_is_never_exceeded_and_its_slots_go_to_the_others():
    shares = {"capped": Share(10, cap=2), "other": Share(1)}
    assert next_turn({"capped": Share(10, cap=2, running=2)}, {"capped"}) is None
    peak = 0
    waiting = {"capped", "other"}
    for _ in range(8):
        name = next_turn(shares, waiting)
        assert name is not None
        shares[name].running += 1
        peak = max(peak, shares["capped"].running)
    assert peak == 2 and shares["other"].running == 6
