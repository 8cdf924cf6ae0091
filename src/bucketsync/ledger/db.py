"""The seam between the ledger's logic and its database: SQLite or PostgreSQL.

``Ledger`` (ledger/ledger.py) holds every rule of the ledger and sends its SQL through a
``Db``; a backend holds only what is its database's own: connections, transactions,
errors, the schema and its versions. The SQL is written once, in the subset both
databases speak (``ON CONFLICT``, ``RETURNING``, ``IS [NOT] DISTINCT FROM``, ``CAST``
to ``BIGINT``/``DOUBLE PRECISION``), with ``?`` or ``?N`` placeholders; a backend that
numbers its parameters (PostgreSQL's ``$n``) translates each statement once (cached).
The few expressions that have no common spelling ask the ``Dialect``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncGenerator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

Row = Sequence[Any]


class Tx(Protocol):
    """One write transaction: every statement commits together or not at all."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of a query (or of ``RETURNING``), seeing this transaction's own writes."""
        ...


class Dialect(Protocol):
    """What the two databases spell differently, beyond placeholders."""

    name: str

    def json_text(self, column: str, param: str) -> str:
        """The text of the member named by the bound ``param`` (a name) of a JSON text column."""
        ...

    def json_patch(self, target: str, patch: str) -> str:
        """``target`` with the members of ``patch`` merged in (JSON text columns, RFC 7396)."""
        ...

    def position(self, needle: str, haystack: str) -> str:
        """1-based position of ``needle`` in ``haystack``, 0 when absent."""
        ...

    def no_index(self, column: str) -> str:
        """``column`` as an expression the planner will not match to an index on it."""
        ...

    def index_term(self, expr: str, nullable: bool) -> str:
        """An index column in the catalog's sort order (``Sort.order_sql``): NULLs first."""
        ...


class Db(Protocol):
    """A ledger database. Reads see every commit before them; writes go through
    ``transaction``, one at a time per process (and per database, across processes),
    so a transaction's reads and writes see no other writer's half-done work."""

    @property
    def dialect(self) -> Dialect: ...

    #: where the ledger is, for messages (a file path, or a URL without its password)
    where: str
    #: why writes are failing (a full disk, ...); None once a write commits again
    fault: str | None
    #: (ledger seq, sidecar seq) when start-up found the ledger behind its sidecar (SQLite)
    rolled_back: tuple[int, int] | None

    def transaction(self) -> AbstractAsyncContextManager[Tx]: ...

    async def read(self, sql: str, params: Sequence[Any] = (), *, primary: bool = False) -> list[Row]:
        """A read of what is committed, run whole. ``primary`` reads where the writes go (on
        SQLite the writer's connection; the same as any read elsewhere)."""
        ...

    def stream(self, sql: str, params: Sequence[Any], batch: int) -> AsyncGenerator[list[Row], None]:
        """A query's rows in batches, all from one consistent snapshot however long the
        walk takes (the run's own commits meanwhile do not shift it)."""
        ...

    async def version(self) -> int:
        """A number that moves whenever anyone commits (caches of reads compare it)."""
        ...

    async def has_table(self, name: str) -> bool: ...

    async def has_column(self, table: str, column: str) -> bool: ...

    async def indexes(self, prefix: str) -> list[tuple[str, str]]:
        """(name, definition) of the indexes whose names start with ``prefix``."""
        ...

    async def create_index(self, name: str, sql: str) -> bool:
        """Run a ``CREATE INDEX IF NOT EXISTS``; True when the index was new."""
        ...

    async def claim(self, shared: bool = False) -> None:
        """Make this process the ledger's one agent (invariant 10), or raise ``LedgerLocked``.
        SQLite's is the file lock the agent takes before opening (``InstanceLock``). ``shared``
        (PostgreSQL): one of the daemons that divide the datasets by leases; they exclude an
        exclusive claimer (the CLI's own agent) and it excludes them."""
        ...

    async def probe_write(self) -> None:
        """The cheapest write transaction: does the ledger take writes (again)?"""
        ...

    async def close(self) -> None: ...


_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?(\d*)")


@functools.lru_cache(maxsize=4096)
def numbered(sql: str) -> str:
    """``?`` and ``?N`` placeholders as ``$n`` (PostgreSQL), outside quoted text.

    Bare ``?`` count from 1 in order, like SQLite's; ``?N`` keeps its number. Each distinct
    statement is translated once: the ledger's statements are a small fixed set, and the
    catalog's vary only by their (fixed-name) fields.
    """
    count = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal count
        if m.group(0)[0] != "?":
            return m.group(0)
        if m.group(1):
            return "$" + m.group(1)
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(sub, sql)


def rowcount(status: str) -> int:
    """The row count of a PostgreSQL command status (``UPDATE 3``, ``INSERT 0 1``); 0 if none."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
