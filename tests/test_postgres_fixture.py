"""The suite's own PostgreSQL works: a driver connects to the URL it hands out, and databases are fresh."""

from __future__ import annotations

import asyncpg

from emulators.postgres import PostgresServer


async def test_a_driver_connects_to_the_session_database(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        version = await conn.fetchval("SELECT version()")
        assert version.startswith("PostgreSQL ")
        # The cluster sorts text by bytes, as SQLite does: keys must order the same on both backends.
        ordered = await conn.fetchval("SELECT array_agg(k ORDER BY k) FROM (VALUES ('a'), ('_'), ('B'), ('é')) AS v(k)")
        assert ordered == sorted(["a", "_", "B", "é"], key=str.encode)
    finally:
        await conn.close()


async def test_new_database_is_empty_and_a_copy_of_its_template(postgres_server: PostgresServer) -> None:
    template_url = postgres_server.new_database()
    template = template_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(template_url)
    try:
        await conn.execute("CREATE TABLE marker (id integer); INSERT INTO marker VALUES (7)")
    finally:
        await conn.close()

    empty = await asyncpg.connect(postgres_server.new_database())
    copy = await asyncpg.connect(postgres_server.new_database(template))
    try:
        assert await empty.fetchval("SELECT to_regclass('marker')") is None
        assert await copy.fetchval("SELECT id FROM marker") == 7
    finally:
        await empty.close()
        await copy.close()
    postgres_server.drop_database(template)
