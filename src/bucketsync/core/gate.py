"""The gate: the one place that decides whether removals and downstream writes may happen.

Pure functions of (what is planned, driver, dataset, run health) to a ``Decision``;
no I/O, so every rule is a unit test away.
"""

from __future__ import annotations

from dataclasses import dataclass

from bucketsync.core.keys import HIDDEN


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: a stable, machine-readable code (metrics label, API error code); "" when allowed
    reason: str = ""
    message: str = ""


ALLOW = Decision(True)


def removal_guard(
    *,
    removals: int,
    live_before: int,
    listing_complete: bool,
    max_delete_ratio: float,
    max_delete_count: int,
    force: bool = False,
) -> Decision:
    """May a run remove ``removals`` of the ``live_before`` items it started with?

    No removal ever follows an incomplete listing (invariant 1) — not even forced.
    Past the mass-delete limits (invariant 4) only ``force`` lets it through.
    """
    if removals == 0:
        return ALLOW
    if not listing_complete:
        return Decision(False, "listing_incomplete", "the listing failed or was incomplete; nothing is removed")
    if force:
        return ALLOW
    if max_delete_count and removals > max_delete_count:
        return Decision(
            False,
            "max_delete_count",
            f"the run would remove {removals} items, more than max_delete_count={max_delete_count}; "
            "nothing was removed (re-run with --force, or force=true through the API, if this is intended)",
        )
    if live_before and removals / live_before > max_delete_ratio:
        return Decision(
            False,
            "max_delete_ratio",
            f"the run would remove {removals} of {live_before} items ({removals / live_before:.0%}), "
            f"more than max_delete_ratio={max_delete_ratio:g}; nothing was removed "
            "(re-run with --force, or force=true through the API, if this is intended)",
        )
    return ALLOW


# -- downstream: every write and delete a user asks for ------------------------------

#: what a permitted delete does
DELETE_OBJECT = "delete"
TOMBSTONE = "tombstone"


@dataclass(frozen=True, slots=True)
class OpDecision(Decision):
    #: for deletes: DELETE_OBJECT (storage and ledger) or TOMBSTONE (ledger only)
    action: str = ""


STORAGE_DENIED = "storage_denied_writes"


def _storage_denied(op: str, why: str) -> OpDecision:
    return OpDecision(
        False,
        STORAGE_DENIED,
        f"storage denied writes, so this {op} is refused: the permission probe found {why}; grant the "
        "permission (the agent probes again on its own) or set the dataset read_only",
    )


def decide_put(
    *, read_only: bool, quota: int | None, live_items: int, new_key: bool, storage_denies: str | None = None
) -> OpDecision:
    """May a user write this key? ``new_key`` is False for an overwrite of a live item.
    ``storage_denies``: why storage refuses puts (the probe's finding), None when it takes them."""
    if read_only:
        return OpDecision(False, "read_only", "the dataset is read-only: writes are refused")
    if storage_denies is not None:
        return _storage_denied("put", storage_denies)
    if quota is not None and new_key and live_items >= quota:
        return OpDecision(False, "quota", f"the dataset is at its quota of {quota} items: new items are refused")
    return OpDecision(True, action="put")


#: a pointer item (clone) goes from its catalog; its binary belongs to the source
UNLINK = "unlink"


#: how a linked item came (``Item.link``): through the API (no object in the bucket) or as a link file
LINK_API = "api"
LINK_FILE = "file"


def decide_delete(
    *,
    key: str,
    read_only: bool,
    allow_delete: bool,
    storage_denies: str | None = None,
    pointer: bool = False,
    link: str | None = None,
) -> OpDecision:
    """What deleting an item does (invariants 2 and 3).

    Storage objects are deleted only when the driver has ``allow_delete``; otherwise
    the item becomes a tombstone and the object stays. bucketsync's own files in the
    hidden folder (the probe's test-file) are always its to delete. A pointer item of a
    clone is only unlinked from the clone, whatever ``allow_delete`` says: the object is
    the source dataset's.

    A linked item never reaches storage either, whatever ``allow_delete`` and ``read_only``
    say (deleting it writes nothing to storage): one made through the API has no object, so
    it is unlinked; one from a link file is tombstoned, so the file the user put in the
    bucket stays and the next sync does not bring the item back.
    """
    if pointer or link == LINK_API:
        return OpDecision(True, action=UNLINK)
    if link == LINK_FILE:
        return OpDecision(True, action=TOMBSTONE)
    if key.startswith(HIDDEN):
        return OpDecision(True, action=DELETE_OBJECT)
    if read_only:
        return OpDecision(False, "read_only", "the dataset is read-only: deletes are refused")
    if allow_delete:
        if storage_denies is not None:  # a tombstone would not be what the user asked for either
            return _storage_denied("delete", storage_denies)
        return OpDecision(True, action=DELETE_OBJECT)
    return OpDecision(True, action=TOMBSTONE)


MOVE_NEEDS_DELETE = "move_needs_allow_delete"


def decide_move(*, key: str, read_only: bool, allow_delete: bool, storage_denies: str | None = None) -> OpDecision:
    """Moving an item in a synced dataset: a copy to the new key, then a delete of the old
    object. The delete is a storage delete like any other (invariant 2): without
    ``allow_delete`` it would only tombstone, leaving the object twice in the bucket, so
    the move is refused before anything is copied."""
    decision = decide_delete(key=key, read_only=read_only, allow_delete=allow_delete, storage_denies=storage_denies)
    if not decision.allowed:
        return decision
    if decision.action != DELETE_OBJECT:
        return OpDecision(
            False,
            MOVE_NEEDS_DELETE,
            "a move in a synced dataset copies the object to its new key and then deletes the old object; "
            "the driver has allow_delete = false, so nothing was moved",
        )
    return decision
