"""The ledger conformance suite (tests/ledger_conformance.py) on every ledger backend.

``ledger_factory`` is parametrized by backend: each entry of ``PLACES`` makes a fresh, empty place for one
test (a SQLite file path, a PostgreSQL database URL) from pytest's ``request``, and ``Ledger.open`` takes
either. A backend joins the suite with one entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from bucketsync.ledger.ledger import Ledger
from emulators.postgres import PostgresServer
from ledger_conformance import CHECKS, Check, Opener

#: backend -> a fresh place for a ledger (what ``Ledger.open`` takes), made for one test
PLACES: dict[str, Callable[[pytest.FixtureRequest], Path | str]] = {
    "sqlite": lambda request: request.getfixturevalue("tmp_path") / "state" / "ledger.db",
    # A copy of a database where a ledger was opened once (the schema, no rows): creating the schema
    # in every test's database cost 0.45 s each.
    "postgresql": lambda request: request.getfixturevalue("postgres_server").new_database(
        request.getfixturevalue("postgres_ledger_template")
    ),
}


@pytest.fixture(scope="module")
def postgres_ledger_template(postgres_server: PostgresServer) -> str:
    """The name of a database holding an empty ledger's schema, closed (a template has no connections)."""
    url = postgres_server.new_database()

    async def create_schema() -> None:
        await (await Ledger.open(url)).close()

    asyncio.run(create_schema())
    return url.rsplit("/", 1)[1]


@pytest.fixture(params=sorted(PLACES))
def ledger_factory(request: pytest.FixtureRequest) -> Opener:
    """Opens the ledger at one fresh place, the same place at every call (a check reopens it to restart)."""
    place = PLACES[request.param](request)

    async def open_ledger() -> Ledger:
        return await Ledger.open(place)

    return open_ledger


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_ledger_conformance(check: Check, ledger_factory: Opener) -> None:
    await check(ledger_factory)
