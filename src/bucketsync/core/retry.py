"""Capped exponential backoff with full jitter, for ``Transient`` errors only."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bucketsync.core.errors import Transient

T = TypeVar("T")


def backoff(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): uniform in [0, min(cap, base*2^n)]."""
    return random.uniform(0, min(cap, base * (2 ** (attempt - 1))))


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int = 5,
    base: float = 0.2,
    cap: float = 10.0,
) -> T:
    """Await ``call()`` and retry it on ``Transient`` up to ``attempts`` times in all.

    Only for idempotent calls (reads, listings of one page, conditional writes,
    deletes): a blind retry of a non-idempotent write could apply it twice.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Transient:
            if attempt == attempts:
                raise
            await asyncio.sleep(backoff(attempt, base, cap))
    raise AssertionError("unreachable")
