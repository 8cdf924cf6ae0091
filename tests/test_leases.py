"""The lease loop's pure decisions: the fair share and what to claim or release."""

from __future__ import annotations

from bucketsync.core.leases import Plan, default_agent_id, fair_share, plan


def test_the_fair_share_is_the_ceiling_over_live_agents_capped_by_max_datasets() -> None:
    assert fair_share(12, 3) == 4
    assert fair_share(12, 5) == 3  # ceil: every dataset finds an owner
    assert fair_share(12, 0) == 12  # not yet counted: an agent still counts itself
    assert fair_share(12, 1, cap=5) == 5
    assert fair_share(12, 3, cap=0) == 4  # 0: no cap
    assert fair_share(0, 3) == 0


def test_an_agent_claims_up_to_its_share_and_releases_the_surplus_when_agents_join() -> None:
    assert plan(set(), 4) == Plan(4, ())
    assert plan({"a", "b"}, 4) == Plan(2, ())
    assert plan({"a", "b", "c", "d"}, 4) == Plan(0, ())
    # a second agent joined: 12 datasets / 2 -> 6; a third: 4. The last names in order go.
    held = {f"ds{i:02}" for i in range(12)}
    assert plan(held, 6) == Plan(0, tuple(f"ds{i:02}" for i in range(6, 12)))


def test_agent_ids_are_unique_per_process_start() -> None:
    assert default_agent_id() != default_agent_id()
