"""The catalog's filter language on a real ledger, SQLite and PostgreSQL: every operator, sorts
and cursors over mixed types and missing values, bad filters named precisely, no injection, and
the expression index actually used."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
import pytest
import pytest_asyncio

from bucketsync.catalog import items as catalog_items
from bucketsync.catalog import query
from bucketsync.catalog.items import Query
from bucketsync.core.errors import InvalidFilter
from bucketsync.core.model import Counts, ItemState, ObjectInfo
from bucketsync.ledger.ledger import Ledger
from bucketsync.ledger.postgres import PostgresDb, translate

T0 = 1_700_000_000.0
#: key -> (size, modified offset, user metadata)
ITEMS: dict[str, tuple[int, float, dict[str, Any]]] = {
    "a/1.jpg": (100, 0, {"camera": "x100", "iso": 200, "ok": True}),
    "a/2.jpg": (200, 10, {"camera": "x100", "iso": 400}),
    "a/3.png": (300, 20, {"camera": "gr3", "iso": 100, "ok": False}),
    "b/1.jpg": (400, 30, {"camera": "gr3"}),
    "b/2.txt": (500, 40, {}),
    "b/3%_.txt": (600, 50, {"iso": "auto"}),
}

#: key -> enrichment's system metadata (enrich/), kept beside the item; the b/ items were never enriched
ENRICHED: dict[str, dict[str, Any]] = {
    "a/1.jpg": {"width": 4000, "height": 3000, "orientation": 6, "format": "JPEG"},
    "a/2.jpg": {"width": 800, "height": 600, "orientation": 1, "format": "JPEG"},
    "a/3.png": {"width": 1200, "height": 1200, "format": "PNG"},
}


#: one catalog for the whole module (building it is most of the time); only the last test adds to it
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgresql"])
async def catalog(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Ledger, int]]:
    if request.param == "sqlite":
        place: Any = request.getfixturevalue("tmp_path_factory").mktemp("catalog") / "ledger.db"
    else:
        place = request.getfixturevalue("postgres_server").new_database()
    ledger = await Ledger.open(place)
    ds = await ledger.dataset_id("photos")
    run = await ledger.begin_run(ds, forced=False)
    adds = [ObjectInfo(k, size, T0 + dt, f"e{i}") for i, (k, (size, dt, _m)) in enumerate(ITEMS.items())]
    await ledger.write_batch(ds, run, adds, [], Counts())
    for key, (_s, _d, meta) in ITEMS.items():
        item = await ledger.item(ds, key)
        assert item is not None
        if meta:
            await ledger.merge_meta(item.id, meta)
    b1 = await ledger.item(ds, "b/1.jpg")
    assert b1 is not None
    await ledger.set_state(b1.id, ItemState.TOMBSTONE)
    enriched = [(await ledger.item(ds, key), meta) for key, meta in ENRICHED.items()]
    async with ledger.db.transaction() as tx:
        for item, meta in enriched:
            assert item is not None
            await tx.execute(
                "INSERT INTO enrichment (item_id, dataset_id, etag, state, meta, updated) "
                "VALUES (?, ?, ?, 'done', ?, ?)",
                (item.id, ds, item.etag, json.dumps(meta), T0),
            )
    try:
        yield ledger, ds
    finally:
        await ledger.close()


async def keys(
    catalog: tuple[Ledger, int], flt: Any = None, *, sort: str | None = None, state: str | None = None
) -> list[str]:
    ledger, ds = catalog
    items, _ = await catalog_items.page(
        ledger, ds, Query(filter=flt, sort=query.parse_sort(sort), state=state, limit=1000)
    )
    return [i.key for i in items]


async def walk(catalog: tuple[Ledger, int], q: Query) -> list[str]:
    """Every page of ``q`` from its first, through the cursors it hands out: the keys in order."""
    ledger, ds = catalog
    walked: list[str] = []
    while True:
        page, q.cursor = await catalog_items.page(ledger, ds, q)
        assert len(page) <= q.limit
        walked += [i.key for i in page]
        if q.cursor is None:
            return walked


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"metadata.camera": "x100"}, ["a/1.jpg", "a/2.jpg"]),
        ({"metadata.camera": {"$eq": "gr3"}}, ["a/3.png", "b/1.jpg"]),
        ({"metadata.camera": {"$ne": "x100"}}, ["a/3.png", "b/1.jpg", "b/2.txt", "b/3%_.txt"]),
        ({"size": {"$gt": 300}}, ["b/1.jpg", "b/2.txt", "b/3%_.txt"]),
        ({"size": {"$gte": 300, "$lt": 500}}, ["a/3.png", "b/1.jpg"]),
        ({"size": {"$lte": 200}}, ["a/1.jpg", "a/2.jpg"]),
        ({"metadata.iso": {"$in": [100, 400, "auto"]}}, ["a/2.jpg", "a/3.png", "b/3%_.txt"]),
        ({"metadata.iso": {"$exists": True}}, ["a/1.jpg", "a/2.jpg", "a/3.png", "b/3%_.txt"]),
        ({"metadata.iso": {"$exists": False}}, ["b/1.jpg", "b/2.txt"]),
        ({"metadata.iso": None}, ["b/1.jpg", "b/2.txt"]),
        ({"key": {"$prefix": "a/"}}, ["a/1.jpg", "a/2.jpg", "a/3.png"]),
        ({"key": {"$prefix": "b/3%_"}}, ["b/3%_.txt"]),  # % and _ mean themselves
        ({"key": {"$prefix": "b/%"}}, []),
        ({"metadata.ok": True}, ["a/1.jpg"]),
        ({"metadata.ok": False}, ["a/3.png"]),
        ({"modified": {"$gte": "2023-11-14T22:13:50Z"}}, ["b/1.jpg", "b/2.txt", "b/3%_.txt"]),
        ({"modified": {"$lt": T0 + 10}}, ["a/1.jpg"]),
        ({"state": "tombstone"}, ["b/1.jpg"]),
        ({"mimetype": {"$exists": False}}, list(ITEMS)),
        ({"$or": [{"size": 100}, {"metadata.camera": "gr3"}]}, ["a/1.jpg", "a/3.png", "b/1.jpg"]),
        (
            {"$and": [{"key": {"$prefix": "a/"}}, {"$or": [{"metadata.iso": {"$gt": 150}}, {"size": 300}]}]},
            ["a/1.jpg", "a/2.jpg", "a/3.png"],
        ),
        ({}, list(ITEMS)),
    ],
)
async def test_each_operator(catalog: tuple[Ledger, int], flt: dict[str, Any], expected: list[str]) -> None:
    assert await keys(catalog, flt) == expected


async def test_state_parameter_combines_with_the_filter(catalog: tuple[Ledger, int]) -> None:
    assert await keys(catalog, {"metadata.camera": "gr3"}, state="live") == ["a/3.png"]


@pytest.mark.parametrize(
    ("flt", "at"),
    [
        ({"size": {"$gt": "big"}}, "size.$gt"),
        ({"$and": [{"size": 1}, {"colour": "red"}]}, "$and[1].colour"),
        ({"$or": [{"size": {"$near": 1}}]}, "$or[0].size.$near"),
        ({"$or": []}, "$or"),
        ({"$not": {"size": 1}}, "$not"),
        ({"metadata.iso": {"$in": []}}, "metadata.iso.$in"),
        ({"metadata.iso": {"$in": [1, {"a": 1}]}}, "metadata.iso.$in[1]"),
        ({"metadata.iso": {"$exists": "yes"}}, "metadata.iso.$exists"),
        ({"size": {"$prefix": "1"}}, "size.$prefix"),
        ({"state": "gone"}, "state.$eq"),
        ({"modified": {"$gt": "yesterday"}}, "modified.$gt"),
        ({"modified": {"$gt": "2024-01-01T00:00:00"}}, "modified.$gt"),
        ({"metadata.x'); DROP TABLE items; --": 1}, "metadata.x'); DROP TABLE items; --"),
        ({"metadata.camera": {}}, "metadata.camera"),
        ({"metadata.camera": {"$gt": True}}, "metadata.camera.$gt"),
        ([1, 2], "$"),
    ],
)
async def test_a_bad_filter_names_its_offending_part(catalog: tuple[Ledger, int], flt: Any, at: str) -> None:
    with pytest.raises(InvalidFilter) as err:
        await keys(catalog, flt)
    assert err.value.at == at
    assert str(err.value).startswith(f"filter at {at}: ")


async def test_values_are_bound_never_in_the_sql() -> None:
    hostile = "x'); DROP TABLE items; --"
    compiled = query.compile_filter({"metadata.camera": hostile, "key": {"$prefix": hostile, "$in": [hostile]}})
    assert hostile not in compiled.sql
    assert compiled.params.count(hostile) == 3
    assert query.parse_filter('{"key": "a"}') == {"key": "a"}
    with pytest.raises(InvalidFilter, match=r"filter at \$: not JSON"):
        query.parse_filter("{key: 1}")


async def test_a_hostile_value_matches_nothing_and_harms_nothing(catalog: tuple[Ledger, int]) -> None:
    assert await keys(catalog, {"key": "a' OR '1'='1"}) == []
    assert len(await keys(catalog)) == len(ITEMS)


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("size", list(ITEMS)),
        ("-size", list(reversed(ITEMS))),
        ("-key", list(reversed(ITEMS))),
        # missing first, then numbers, then text (SQLite's order of types); key breaks ties
        ("metadata.iso", ["b/1.jpg", "b/2.txt", "a/3.png", "a/1.jpg", "a/2.jpg", "b/3%_.txt"]),
        ("-metadata.iso", ["b/3%_.txt", "a/2.jpg", "a/1.jpg", "a/3.png", "b/2.txt", "b/1.jpg"]),
        ("metadata.camera", ["b/2.txt", "b/3%_.txt", "a/3.png", "b/1.jpg", "a/1.jpg", "a/2.jpg"]),
    ],
)
async def test_sort_and_every_page_size_walk_the_same_order(
    catalog: tuple[Ledger, int], sort: str, expected: list[str]
) -> None:
    """A cursor continues exactly after the last item, across NULLs, types and ties."""
    assert await keys(catalog, sort=sort, state=None) == expected
    for size in (1, 2, 4):
        q = Query(sort=query.parse_sort(sort), state=None, limit=size)
        walked = await walk(catalog, q)
        assert walked == expected, f"page size {size}"


async def test_every_nullable_field_sorts_and_pages_as_sqlite_does(catalog: tuple[Ledger, int]) -> None:
    """Each system field that can be missing sorts it first ascending and last descending on both
    backends (PostgreSQL's own default is the opposite), so a cursor walks every item once. The
    fields come from the catalog's own list: a nullable field added later is checked too."""
    ledger, _ = catalog
    ds = await ledger.dataset_id("links")
    run = await ledger.begin_run(ds, forced=False)
    await ledger.write_batch(
        ds, run, [ObjectInfo("plain/1", 1, T0, None), ObjectInfo("plain/2", 2, T0, None)], [], Counts()
    )
    await ledger.add_links(
        ds, [("l/1", "https://example.org/b", "image/png", None), ("l/2", "https://example.org/a", None, None)]
    )
    nullable = [f for f in query.SYSTEM.values() if f.nullable and not f.beside]
    assert {"etag", "version", "mimetype", "link", "ref"} <= {f.name for f in nullable}
    for f in nullable:
        for sort in (f.name, f"-{f.name}"):
            items, _ = await catalog_items.page(ledger, ds, Query(sort=query.parse_sort(sort), limit=100))
            values = [(getattr(i, f.sql) if f.sql != "content_type" else i.content_type, i.key) for i in items]
            missing_first = sorted(values, key=lambda v: (v[0] is not None, v[0] or "", v[1]))
            expected = missing_first if sort[0] != "-" else missing_first[::-1]
            assert [k for _v, k in values] == [k for _v, k in expected], sort
            for size in (1, 3):
                walked = await walk((ledger, ds), Query(sort=query.parse_sort(sort), limit=size))
                assert walked == [k for _v, k in expected], (sort, size)


@pytest.mark.parametrize("size", [1, 3])
async def test_a_sort_the_filter_pins_walks_by_key(catalog: tuple[Ledger, int], size: int) -> None:
    """Held to one value by the filter, the sort field orders as the key does (SQLite then
    walks the field's index instead of sorting every match), across pages."""
    flt = {"metadata.camera": {"$eq": "x100"}, "size": {"$gt": 0}}
    assert query.pinned(flt, query.field("metadata.camera"))
    assert not query.pinned({"metadata.camera": {"$gt": "x"}}, query.field("metadata.camera"))
    assert not query.pinned({"$or": [{"metadata.camera": "x"}]}, query.field("metadata.camera"))
    for sort in ("metadata.camera", "-metadata.camera"):
        q = Query(filter=flt, sort=query.parse_sort(sort), limit=size)
        walked = await walk(catalog, q)
        assert walked == (["a/1.jpg", "a/2.jpg"] if sort[0] != "-" else ["a/2.jpg", "a/1.jpg"])


async def test_a_cursor_of_another_sort_is_refused(catalog: tuple[Ledger, int]) -> None:
    ledger, ds = catalog
    _, cursor = await catalog_items.page(ledger, ds, Query(limit=1))
    assert cursor is not None
    with pytest.raises(InvalidFilter) as err:
        await catalog_items.page(ledger, ds, Query(sort=query.parse_sort("size"), cursor=cursor))
    assert err.value.at == "cursor"
    with pytest.raises(InvalidFilter) as err:
        query.parse_sort("-colour")
    assert err.value.at == "sort"


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"width": {"$gt": 1000}}, ["a/1.jpg", "a/3.png"]),
        ({"display_width": {"$gte": 0}}, []),  # not recorded by this fixture: missing everywhere
        ({"format": "PNG"}, ["a/3.png"]),
        ({"format": {"$prefix": "JP"}, "height": {"$lt": 1000}}, ["a/2.jpg"]),
        ({"orientation": {"$in": [5, 6, 7, 8]}}, ["a/1.jpg"]),
        ({"width": {"$exists": False}}, ["b/1.jpg", "b/2.txt", "b/3%_.txt"]),
    ],
)
async def test_enrichments_metadata_filters_like_a_field(
    catalog: tuple[Ledger, int], flt: dict[str, Any], expected: list[str]
) -> None:
    """Width, height, orientation, format...: kept beside the item by enrichment, filtered in
    the same language as the item's own fields (missing until an item is enriched)."""
    assert await keys(catalog, flt) == expected


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("-width", ["a/1.jpg", "a/3.png", "a/2.jpg", "b/3%_.txt", "b/2.txt", "b/1.jpg"]),
        ("height", ["b/1.jpg", "b/2.txt", "b/3%_.txt", "a/2.jpg", "a/3.png", "a/1.jpg"]),
    ],
)
async def test_a_sort_on_enrichments_metadata_pages_with_its_cursor(
    catalog: tuple[Ledger, int], sort: str, expected: list[str]
) -> None:
    """A cursor's value for a field outside the item's row is read back for the page's last item."""
    ledger, ds = catalog
    for size in (1, 2, 4):
        q = Query(sort=query.parse_sort(sort), state=None, limit=size)
        walked = await walk(catalog, q)
        assert walked == expected, f"page size {size}"
    with pytest.raises(InvalidFilter) as err:
        await catalog_items.ensure_index(ledger, ds, "width")
    assert err.value.at == "index" and "cannot be indexed" in str(err.value)


async def test_an_index_serves_the_filter_and_the_sort(catalog: tuple[Ledger, int]) -> None:
    ledger, ds = catalog
    q = Query(filter={"metadata.camera": {"$gt": "a"}}, sort=query.parse_sort("metadata.camera"), limit=10)
    (where,) = q.compile()
    sql = (
        f"EXPLAIN QUERY PLAN SELECT id FROM items WHERE dataset_id = {ds} AND "
        f"{where.sql} ORDER BY {q.sort.order_sql()} LIMIT 10"
    )

    async def plan() -> str:
        if ledger.path is None:  # PostgreSQL: would the planner walk the index, without a sort?
            assert isinstance(ledger.db, PostgresDb)
            async with ledger.db.pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL enable_seqscan = off")  # six rows: a scan is always cheapest
                rows = await conn.fetch(translate(sql.replace("EXPLAIN QUERY PLAN", "EXPLAIN")), *where.params)
            text = " | ".join(str(r[0]) for r in rows)
            return text.replace("Sort", "TEMP B-TREE")  # a sort node, in SQLite's words
        # A fresh connection: a cached EXPLAIN statement would not notice the new index.
        async with aiosqlite.connect(ledger.path) as db, db.execute(sql, where.params) as cur:
            return " | ".join(str(r[-1]) for r in await cur.fetchall())

    assert "items_by_meta_camera" not in await plan()
    assert await catalog_items.ensure_index(ledger, ds, "metadata.camera") is True
    assert await catalog_items.ensure_index(ledger, ds, "metadata.camera") is False  # once
    assert await catalog_items.ensure_index(ledger, ds, "mimetype") is True
    assert await catalog_items.ensure_index(ledger, ds, "content_type") is False  # the same expression
    found = await plan()
    assert "items_by_meta_camera" in found and "TEMP B-TREE" not in found, found
    assert await catalog_items.indexed_fields(ledger, ds) == ["metadata.camera", "mimetype"]
    assert await catalog_items.indexed_fields(ledger, ds + 1) == []  # an index is one dataset's
    assert await keys(catalog, {"metadata.camera": "x100"}) == ["a/1.jpg", "a/2.jpg"]
    with pytest.raises(InvalidFilter):
        await catalog_items.ensure_index(ledger, ds, "colour")


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("metadata.camera", ["b/2.txt", "b/3%_.txt", "a/3.png", "b/1.jpg", "a/1.jpg", "a/2.jpg"]),
        ("-metadata.camera", ["a/2.jpg", "a/1.jpg", "b/1.jpg", "a/3.png", "b/3%_.txt", "b/2.txt"]),
    ],
)
async def test_pages_through_an_index_seek_the_ties_then_the_rest(
    catalog: tuple[Ledger, int], sort: str, expected: list[str]
) -> None:
    """With the field indexed (the test above built it), a cursor is two index seeks: the
    ties of its value after its key, then the values beyond; the walk is the same."""
    ledger, ds = catalog
    assert "metadata.camera" in await catalog_items.indexed_fields(ledger, ds)
    for size in (1, 2, 4):
        q = Query(sort=query.parse_sort(sort), state=None, limit=size)
        walked = await walk(catalog, q)
        assert walked == expected, f"page size {size}"
    q = Query(sort=query.parse_sort(sort), state=None, limit=1)
    _page, q.cursor = await catalog_items.page(ledger, ds, q)
    ties = q.compile()[0]
    sql = (
        f"EXPLAIN QUERY PLAN SELECT id FROM items WHERE dataset_id = {ds} AND {ties.sql} ORDER BY {q.sort.order_sql()}"
    )
    if ledger.path is None:  # PostgreSQL: the seek is the index's condition on the key
        assert isinstance(ledger.db, PostgresDb)
        async with ledger.db.pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")  # six rows: a scan is always cheapest
            rows = await conn.fetch(translate(sql.replace("EXPLAIN QUERY PLAN", "EXPLAIN")), *ties.params)
        found = " | ".join(str(r[0]) for r in rows)
        plan = found.replace(" ", "")
        assert "items_by_meta_camera" in plan and ("(key<" in plan or "(key>" in plan), found
        return
    async with aiosqlite.connect(ledger.path) as db, db.execute(sql, ties.params) as cur:
        found = " | ".join(str(r[-1]) for r in await cur.fetchall())
    plan = found.replace(" ", "")
    assert "items_by_meta_camera" in plan and ("key<?" in plan or "key>?" in plan), found


@pytest.mark.parametrize(
    ("flt", "excludes"),
    [
        ({"metadata.camera": "x100"}, True),
        ({"metadata.camera": {"$gte": "a"}}, True),
        ({"metadata.camera": {"$in": ["x100", "gr3"]}}, True),
        ({"metadata.camera": {"$prefix": "x"}}, True),
        ({"metadata.camera": {"$exists": True}}, True),
        ({"metadata.camera": {"$ne": None}}, True),
        ({"metadata.camera": {"$ne": "x100"}}, False),  # a missing camera is "not x100"
        ({"metadata.camera": {"$exists": False}}, False),
        ({"metadata.camera": None}, False),
        ({"metadata.iso": {"$gt": 1}}, False),  # another field
        ({"$or": [{"metadata.camera": "x100"}]}, False),  # not at the top level: not analysed
        ({}, False),
    ],
)
async def test_which_filters_leave_out_the_missing_values_of_the_sort(flt: dict[str, Any], excludes: bool) -> None:
    assert query.excludes_null(flt, query.field("metadata.camera")) is excludes


async def test_a_descending_walk_with_a_range_filter_never_asks_for_missing_values(
    catalog: tuple[Ledger, int],
) -> None:
    """Descending, the missing values come last; a filter that leaves them out spares the
    query for them, which would walk the filter's whole range through the index to find none."""
    ledger, ds = catalog
    flt = {"metadata.camera": {"$gte": "a"}}
    q = Query(filter=flt, sort=query.parse_sort("-metadata.camera"), state=None, limit=1)
    walked: list[str] = []
    while True:
        page, q.cursor = await catalog_items.page(ledger, ds, q)
        walked += [i.key for i in page]
        if q.cursor is None:
            break
        assert not any("IS NULL" in w.sql for w in q.compile()), q.compile()
    assert walked == ["a/2.jpg", "a/1.jpg", "b/1.jpg", "a/3.png"]
    q = Query(sort=query.parse_sort("-metadata.camera"), state=None, limit=1)
    _page, q.cursor = await catalog_items.page(ledger, ds, q)
    assert "IS NULL" in q.compile()[-1].sql  # without the filter, they are the last segment
