"""Placement policies: which pod a new session goes to, given the placeable pods and their load."""

from __future__ import annotations

import collections
import random
import uuid

import pytest

from router.placement import POLICIES, LeastSessionsP2C, RoundRobin, make_policy, rendezvous

PODS = ["a", "b", "c", "d"]


@pytest.mark.parametrize("policy", [LeastSessionsP2C(random.Random(1)), RoundRobin()],
                         ids=["p2c", "round-robin"])
def test_no_candidate_is_no_choice_and_one_candidate_is_the_choice(policy) -> None:
    assert policy.select([], {}) is None
    assert policy.select(["only"], {"only": 99}) == "only"


def test_p2c_of_two_pods_always_takes_the_less_loaded() -> None:
    policy = LeastSessionsP2C(random.Random(7))
    for _ in range(50):
        assert policy.select(["a", "b"], {"a": 5, "b": 2}) == "b"
        assert policy.select(["a", "b"], {"b": 1}) == "a"  # a pod with no entry holds 0


def test_p2c_never_picks_the_most_loaded_of_several() -> None:
    policy = LeastSessionsP2C(random.Random(3))
    load = {"a": 1, "b": 2, "c": 3, "d": 100}
    picks = collections.Counter(policy.select(PODS, load) for _ in range(400))
    assert "d" not in picks and set(picks) <= {"a", "b", "c"}
    assert picks["a"] > picks["c"]


def test_p2c_keeps_pods_even_as_sessions_are_placed() -> None:
    policy = LeastSessionsP2C(random.Random(11))
    load: dict[str, int] = dict.fromkeys(PODS, 0)
    for _ in range(4000):
        load[policy.select(PODS, load)] += 1  # type: ignore[index]
    assert max(load.values()) - min(load.values()) <= 3, load


def test_round_robin_visits_every_candidate_in_turn() -> None:
    policy = RoundRobin()
    picks = [policy.select(PODS, {}) for _ in range(8)]
    assert collections.Counter(picks) == dict.fromkeys(PODS, 2)
    assert picks[:4] == picks[4:]


def test_rendezvous_is_the_same_on_every_replica_whatever_the_candidate_order() -> None:
    sid = str(uuid.UUID(int=42))
    choice = rendezvous(sid, PODS)
    assert choice in PODS
    assert rendezvous(sid, list(reversed(PODS))) == choice
    assert rendezvous(sid, [p for p in PODS if p != choice]) != choice
    others = [p for p in PODS if p != choice]
    assert rendezvous(sid, [choice, *others[1:]]) == choice, "removing another pod keeps it"
    assert rendezvous(sid, []) is None


def test_rendezvous_spreads_sessions_over_the_pods() -> None:
    picks = collections.Counter(rendezvous(str(uuid.UUID(int=i)), PODS) for i in range(4000))
    assert set(picks) == set(PODS)
    assert min(picks.values()) > 800, picks  # 1000 each on average


def test_policies_are_made_by_name_and_an_unknown_name_lists_the_choices() -> None:
    for name in POLICIES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="choose one of least-sessions-p2c, round-robin"):
        make_policy("random")
