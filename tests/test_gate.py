"""The removal guard (invariants 1 and 4): a pure function, so every rule is checked directly."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bucketsync.core import gate
from bucketsync.core.gate import Decision, removal_guard


def guard(
    removals: int,
    live_before: int,
    *,
    complete: bool = True,
    ratio: float = 0.5,
    count: int = 0,
    force: bool = False,
) -> Decision:
    return removal_guard(
        removals=removals,
        live_before=live_before,
        listing_complete=complete,
        max_delete_ratio=ratio,
        max_delete_count=count,
        force=force,
    )


def test_zero_removals_always_allowed() -> None:
    for complete in (True, False):
        for force in (True, False):
            d = guard(0, 100, complete=complete, count=1, ratio=0.01, force=force)
            assert d.allowed and d.reason == "" and d.message == ""
    assert guard(0, 0).allowed


def test_incomplete_listing_never_removes() -> None:
    d = guard(1, 1000, complete=False)
    assert not d.allowed
    assert d.reason == "listing_incomplete"
    assert "incomplete" in d.message and "nothing is removed" in d.message


def test_incomplete_listing_never_removes_even_forced() -> None:
    d = guard(1, 1000, complete=False, force=True)
    assert not d.allowed
    assert d.reason == "listing_incomplete"


def test_small_removals_allowed() -> None:
    assert guard(1, 10).allowed
    assert guard(4, 10).allowed


def test_ratio_boundary_exactly_at_ratio_is_allowed() -> None:
    assert guard(5, 10, ratio=0.5).allowed
    assert guard(1, 3, ratio=1 / 3).allowed
    assert guard(10, 10, ratio=1.0).allowed


def test_ratio_just_above_is_refused() -> None:
    d = guard(6, 10, ratio=0.5)
    assert not d.allowed
    assert d.reason == "max_delete_ratio"
    d = guard(501, 1000, ratio=0.5)
    assert not d.allowed and d.reason == "max_delete_ratio"


def test_ratio_message_names_the_numbers() -> None:
    d = guard(6, 10, ratio=0.5)
    assert "remove 6 of 10 items" in d.message
    assert "60%" in d.message
    assert "max_delete_ratio=0.5" in d.message
    assert "nothing was removed" in d.message
    assert "--force" in d.message


def test_count_limit() -> None:
    assert guard(3, 1000, count=3).allowed, "exactly at max_delete_count is allowed"
    d = guard(4, 1000, count=3)
    assert not d.allowed
    assert d.reason == "max_delete_count"
    assert "remove 4 items" in d.message
    assert "max_delete_count=3" in d.message
    assert "nothing was removed" in d.message and "--force" in d.message


def test_count_zero_means_no_count_limit() -> None:
    assert guard(400, 1000, count=0).allowed


def test_count_limit_checked_before_ratio() -> None:
    d = guard(9, 10, count=2)
    assert not d.allowed and d.reason == "max_delete_count"


def test_force_passes_both_limits() -> None:
    assert guard(10, 10, ratio=0.1, force=True).allowed
    assert guard(100, 100, count=1, force=True).allowed


@given(
    live_before=st.integers(min_value=1, max_value=10_000),
    data=st.data(),
)
def test_ratio_boundary_property(live_before: int, data: st.DataObject) -> None:
    """For a ratio that is exactly k/n, removing k of n is allowed and k+1 is not."""
    k = data.draw(st.integers(min_value=1, max_value=live_before))
    ratio = k / live_before
    assert guard(k, live_before, ratio=ratio).allowed
    if k < live_before:
        refused = guard(k + 1, live_before, ratio=ratio)
        assert not refused.allowed and refused.reason == "max_delete_ratio"
        assert guard(k + 1, live_before, ratio=ratio, force=True).allowed
        assert not guard(k + 1, live_before, ratio=ratio, force=True, complete=False).allowed


def test_a_move_needs_a_real_delete() -> None:
    """A move is a copy and a delete: without allow_delete the delete would only tombstone
    and the object would be in the bucket twice, so the move is refused whole."""
    refused = gate.decide_move(key="a/b", read_only=False, allow_delete=False)
    assert not refused.allowed and refused.reason == gate.MOVE_NEEDS_DELETE
    assert gate.decide_move(key="a/b", read_only=True, allow_delete=True).reason == "read_only"
    assert gate.decide_move(key="a/b", read_only=False, allow_delete=True, storage_denies="no").reason.startswith(
        "storage_denied"
    )
    assert gate.decide_move(key="a/b", read_only=False, allow_delete=True).action == gate.DELETE_OBJECT


def test_a_pointer_delete_never_reaches_storage() -> None:
    """A clone's item is unlinked, whatever the driver allows: the binary is the source's."""
    for allow in (True, False):
        d = gate.decide_delete(key="a/b", read_only=False, allow_delete=allow, pointer=True)
        assert d.allowed and d.action == gate.UNLINK
    assert gate.decide_delete(key="a/b", read_only=False, allow_delete=True).action == gate.DELETE_OBJECT


def test_a_linked_item_delete_never_reaches_storage() -> None:
    """A link made through the API has no object: it is unlinked. A link file's item is
    tombstoned, so the file the user put in the bucket stays and no sync brings it back.
    Neither deletes an object, whatever allow_delete, read_only or the probe say."""
    for allow in (True, False):
        for read_only in (True, False):
            for denies in (None, "no PutObject"):
                api = gate.decide_delete(
                    key="a/b", read_only=read_only, allow_delete=allow, storage_denies=denies, link=gate.LINK_API
                )
                assert api.allowed and api.action == gate.UNLINK
                f = gate.decide_delete(
                    key="a/b", read_only=read_only, allow_delete=allow, storage_denies=denies, link=gate.LINK_FILE
                )
                assert f.allowed and f.action == gate.TOMBSTONE
