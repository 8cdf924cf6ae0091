"""Leases: which agent syncs which dataset when several share one PostgreSQL ledger (pure).

Every agent runs the same configuration; each dataset is synced by the one agent holding
its lease. These are the decisions of an agent's lease loop, free of I/O: its fair share,
and given what it holds and what is free, what to claim and what to give up. The SQL that
carries them out is ``ledger/leases.py``; the loop is ``daemon/leases.py``.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Fence:
    """What a write made for ``dataset`` proves in its own transaction: that ``owner`` still
    holds the dataset's lease at ``epoch``, unexpired. A later claim bumps the epoch, so a
    paused owner's late write is refused whatever its clock says."""

    dataset: str
    owner: str
    epoch: int


@dataclass(frozen=True)
class Plan:
    """One turn of the lease loop: datasets to claim (free or expired), and held ones to release."""

    claim: int
    release: tuple[str, ...]


def default_agent_id() -> str:
    """hostname-pid-random: unique among the agents on one ledger, and readable in the leases table."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def fair_share(datasets: int, agents: int, cap: int = 0) -> int:
    """How many datasets one agent should hold: ceil(datasets / live agents), at most ``cap``
    (0: no cap). An agent that has not yet seen itself counted still counts as one."""
    share = math.ceil(datasets / max(agents, 1))
    return min(share, cap) if cap > 0 else share


def plan(held: set[str], share: int) -> Plan:
    """Claim up to the share; above it (agents joined, or ``max_datasets`` lowered), release the
    surplus. Released are the last held names in order: every agent picks the same way, so a
    rebalance moves few datasets."""
    if len(held) > share:
        return Plan(0, tuple(sorted(held)[share:]))
    return Plan(share - len(held), ())
