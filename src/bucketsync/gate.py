"""The gate: the one place that decides whether removals and downstream writes may happen.

Pure functions of (what is planned, driver, dataset, run health) to a ``Decision``;
no I/O, so every rule is a unit test away.
"""

from __future__ import annotations

from dataclasses import dataclass


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
            "nothing was removed (re-run with --force if this is intended)",
        )
    if live_before and removals / live_before > max_delete_ratio:
        return Decision(
            False,
            "max_delete_ratio",
            f"the run would remove {removals} of {live_before} items ({removals / live_before:.0%}), "
            f"more than max_delete_ratio={max_delete_ratio:g}; nothing was removed "
            "(re-run with --force if this is intended)",
        )
    return ALLOW
