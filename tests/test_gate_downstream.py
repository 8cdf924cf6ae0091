"""The downstream gate (invariants 2 and 3): ``decide_put`` and ``decide_delete`` as pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bucketsync.core.gate import DELETE_OBJECT, STORAGE_DENIED, TOMBSTONE, OpDecision, decide_delete, decide_put
from bucketsync.core.keys import HIDDEN

# ---------------------------------------------------------------------- decide_put


def test_put_allowed_on_a_plain_dataset() -> None:
    d = decide_put(read_only=False, quota=None, live_items=10_000, new_key=True)
    assert d == OpDecision(True, action="put")
    assert d.reason == "" and d.message == ""


@pytest.mark.parametrize("new_key", [True, False])
@pytest.mark.parametrize("quota", [None, 1, 100])
def test_put_on_read_only_is_refused_whatever_else(new_key: bool, quota: int | None) -> None:
    d = decide_put(read_only=True, quota=quota, live_items=0, new_key=new_key)
    assert not d.allowed
    assert d.reason == "read_only"
    assert "read-only" in d.message


def test_put_quota_boundary() -> None:
    below = decide_put(read_only=False, quota=3, live_items=2, new_key=True)
    at = decide_put(read_only=False, quota=3, live_items=3, new_key=True)
    above = decide_put(read_only=False, quota=3, live_items=7, new_key=True)
    assert below.allowed
    for d in (at, above):
        assert not d.allowed
        assert d.reason == "quota"
        assert "quota of 3" in d.message


def test_overwrite_of_a_live_item_is_allowed_at_and_past_the_quota() -> None:
    for live in (3, 4):
        assert decide_put(read_only=False, quota=3, live_items=live, new_key=False).allowed


def test_read_only_wins_over_quota() -> None:
    d = decide_put(read_only=True, quota=1, live_items=5, new_key=True)
    assert d.reason == "read_only"


@given(
    read_only=st.booleans(),
    quota=st.none() | st.integers(min_value=1, max_value=50),
    live=st.integers(min_value=0, max_value=60),
    new_key=st.booleans(),
)
def test_put_decision_is_exactly_the_rules(read_only: bool, quota: int | None, live: int, new_key: bool) -> None:
    d = decide_put(read_only=read_only, quota=quota, live_items=live, new_key=new_key)
    expected = not read_only and not (quota is not None and new_key and live >= quota)
    assert d.allowed is expected
    if d.allowed:
        assert (d.reason, d.message, d.action) == ("", "", "put")
    else:
        assert d.reason in ("read_only", "quota")
        assert d.message  # a refusal always says why
        assert d.action == ""


# ---------------------------------------------------------------------- decide_delete


def test_delete_without_allow_delete_is_a_tombstone() -> None:
    d = decide_delete(key="photos/a.jpg", read_only=False, allow_delete=False)
    assert d.allowed
    assert d.action == TOMBSTONE
    assert d.reason == ""


def test_delete_with_allow_delete_deletes_the_object() -> None:
    d = decide_delete(key="photos/a.jpg", read_only=False, allow_delete=True)
    assert d.allowed
    assert d.action == DELETE_OBJECT


@pytest.mark.parametrize("allow_delete", [True, False])
def test_delete_on_read_only_is_refused(allow_delete: bool) -> None:
    d = decide_delete(key="a.jpg", read_only=True, allow_delete=allow_delete)
    assert not d.allowed
    assert d.reason == "read_only"
    assert d.action != DELETE_OBJECT
    assert "read-only" in d.message


@pytest.mark.parametrize("read_only", [True, False])
@pytest.mark.parametrize("allow_delete", [True, False])
def test_bucketsyncs_own_hidden_files_may_always_go(read_only: bool, allow_delete: bool) -> None:
    d = decide_delete(key=f"{HIDDEN}probe-0123.txt", read_only=read_only, allow_delete=allow_delete)
    assert d.allowed and d.action == DELETE_OBJECT


@pytest.mark.parametrize("key", [".bucketsyncx/a", "x/.bucketsync/a", ".bucketsync", "a/" + HIDDEN + "b"])
def test_only_the_top_level_hidden_folder_is_special(key: str) -> None:
    """Look-alikes of the hidden folder are user data: no delete without allow_delete."""
    assert decide_delete(key=key, read_only=False, allow_delete=False).action == TOMBSTONE


_keys = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=40).filter(
    lambda k: not k.startswith(HIDDEN)
)


@given(key=_keys, read_only=st.booleans(), allow_delete=st.booleans())
def test_invariant_2_no_object_delete_without_allow_delete(key: str, read_only: bool, allow_delete: bool) -> None:
    d = decide_delete(key=key, read_only=read_only, allow_delete=allow_delete)
    if d.action == DELETE_OBJECT:
        assert allow_delete and not read_only
    if not allow_delete and not read_only:
        assert d.allowed and d.action == TOMBSTONE  # invariant 3: the item goes, the binary stays
    if read_only:
        assert not d.allowed and d.reason == "read_only" and d.message
    if d.allowed:
        assert d.action in (DELETE_OBJECT, TOMBSTONE)


# ---------------------------------------------------------------------- storage that refuses writes


def test_storage_denying_writes_refuses_puts_and_storage_deletes_only() -> None:
    why = "put: permission denied"
    put = decide_put(read_only=False, quota=None, live_items=0, new_key=True, storage_denies=why)
    assert not put.allowed and put.reason == STORAGE_DENIED
    assert "storage denied writes" in put.message and why in put.message
    # read-only says it first: that is the dataset's own rule
    assert decide_put(read_only=True, quota=None, live_items=0, new_key=True, storage_denies=why).reason == "read_only"
    gone = decide_delete(key="a.jpg", read_only=False, allow_delete=True, storage_denies=why)
    assert not gone.allowed and gone.reason == STORAGE_DENIED
    # a tombstone never reaches storage, and the hidden folder is bucketsync's own
    assert decide_delete(key="a.jpg", read_only=False, allow_delete=False, storage_denies=why).action == TOMBSTONE
    hidden = decide_delete(key=f"{HIDDEN}probe-1.txt", read_only=False, allow_delete=True, storage_denies=why)
    assert hidden.action == DELETE_OBJECT
