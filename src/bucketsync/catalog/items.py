"""Pages of items by a catalog query, and the indexes that serve them (the ledger edge
of catalog/query.py: the API and the CLI both call these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bucketsync.catalog.query import (
    META_PREFIX,
    SYSTEM,
    Compiled,
    Field,
    Sort,
    after_sql,
    compile_filter,
    decode_cursor,
    encode_cursor,
    excludes_null,
    fields_of,
    index_name,
    index_sql,
    pinned,
)
from bucketsync.catalog.query import field as field_named
from bucketsync.core.errors import InvalidFilter
from bucketsync.core.model import Item
from bucketsync.enrich.queue import EnrichQueue
from bucketsync.ledger.ledger import Ledger

INDEX_PREFIX = "items_by_"


@dataclass(slots=True)
class Query:
    """What a page asks for: a filter document, a sort, where to continue, how many.

    ``state`` (None: every state), ``prefix`` and ``meta`` (name -> text) are the older
    query parameters of ``GET .../items``; they combine with the filter.
    """

    filter: Any = None
    sort: Sort = field(default_factory=lambda: Sort(SYSTEM["key"]))
    cursor: str | None = None
    limit: int = 100
    state: str | None = "live"
    prefix: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    #: ``system.NAME=VALUE``: the enrichment's system metadata (enrich/), compared as text;
    #: ``system.enrichment`` is the enrichment's state (pending, done, failed)
    system: dict[str, str] = field(default_factory=dict)

    def compile(self, *, seek: bool = True) -> list[Compiled]:
        """The WHERE clauses (after ``dataset_id = ?``) to query in turn for one page: after a
        cursor, its ties and then the values beyond it (two index seeks; one condition with
        ``seek=False``, for a scan), and the missing values where the sort crosses them.
        InvalidFilter on bad input."""
        parts = [compile_filter(self.filter if self.filter is not None else {})]
        if self.state is not None:
            parts.append(Compiled("state = ?", [self.state]))
        if self.prefix:
            parts.append(compile_filter({"key": {"$prefix": self.prefix}}))
        for name, value in self.meta.items():
            # The older meta.NAME=VALUE parameters compare as text, whatever the stored type.
            f = field_named(META_PREFIX + name, f"meta.{name}")
            parts.append(Compiled(f"CAST({f.sql} AS TEXT) = ?", [value]))
        for name, value in self.system.items():
            if name == "enrichment":
                parts.append(Compiled("id IN (SELECT item_id FROM enrichment WHERE state = ?)", [value]))
            else:
                # The JSON path is a bound parameter with the name quoted: no injection.
                path = '$."' + name.replace('"', '""') + '"'
                parts.append(
                    Compiled(
                        "id IN (SELECT item_id FROM enrichment WHERE CAST(json_extract(meta, ?) AS TEXT) = ?)",
                        [path, value],
                    )
                )
        segments = [Compiled("TRUE", [])]
        if self.cursor is not None:
            segments = after_sql(
                self.sort,
                *decode_cursor(self.sort, self.cursor),
                seek=seek,
                nulls=not excludes_null(self.filter, self.sort.field),
            )
        return [
            Compiled(" AND ".join(p.sql for p in [*parts, seg]), [x for p in [*parts, seg] for x in p.params], seg.pins)
            for seg in segments
        ]


def sort_value(item: Item, f: Field) -> Any:
    """The item's value of the sort field, as the ledger holds it (for the next cursor)."""
    if f.name.startswith(META_PREFIX):
        value = item.meta.get(f.name[len(META_PREFIX) :])
        return int(value) if isinstance(value, bool) else value
    return getattr(item, f.sql)


async def page(ledger: Ledger, dataset_id: int, q: Query) -> tuple[list[Item], str | None]:
    """One page of items and the cursor of the next (None on the last page)."""
    wheres = q.compile()  # InvalidFilter before anything is read
    pins = pinned(q.filter, q.sort.field)
    scan = await _scan_table(ledger, dataset_id, q)
    if scan:
        wheres = q.compile(seek=False)
    items: list[Item] = []
    for where in wheres:
        want = q.limit + 1 - len(items)
        order = q.sort.order_sql(pins or where.pins)
        items += await ledger.select_items(dataset_id, where.sql, where.params, order, want, scan=scan)
        if len(items) > q.limit:
            break
    if len(items) <= q.limit:
        return items, None
    items = items[: q.limit]
    last = items[-1]
    f = q.sort.field
    value = await _beside_value(ledger, last, f) if f.beside else sort_value(last, f)
    return items, encode_cursor(q.sort, value, last.key)


async def _beside_value(ledger: Ledger, item: Item, f: Field) -> Any:
    """The item's value of a field kept beside it (enrichment's metadata), for the cursor: as
    JSON holds it, which is what the sort compared (on PostgreSQL too, whose SQL expression
    gives a sortable pair instead)."""
    found = (await EnrichQueue(ledger).of_items([item.id])).get(item.id)
    value = found.meta.get(f.name) if found is not None else None
    return int(value) if isinstance(value, bool) else value


async def _scan_table(ledger: Ledger, dataset_id: int, q: Query) -> bool:
    """Whether to read the dataset's rows in table order rather than through an index.

    With no index on any field it filters or sorts on, SQLite would still walk the
    (dataset, key) index for ``dataset_id = ?`` and fetch each row from the table in key
    order: one random read per item (14 s for a sort at 1,000,000 items, and a filter that
    matches little walks them all). A sequential scan and a top-100 sort are bounded at a
    fraction of that. Without a filter, key order keeps the index: the plain listing stops
    at its 101st item.
    """
    filtered = fields_of(q.filter)
    if q.prefix:
        filtered.append(SYSTEM["key"])
    if not filtered and q.sort.by_key:
        return False
    built = {name for name, _sql in await ledger.indexes(INDEX_PREFIX)}
    if any(f.sql == "key" or index_name(f, dataset_id) in built for f in filtered):
        return False
    return q.sort.by_key or index_name(q.sort.field, dataset_id) not in built


async def ensure_index(ledger: Ledger, dataset_id: int, name: str) -> bool:
    """Index the field called ``name`` for the dataset; True when it was created now.
    InvalidFilter when the field is unknown or cannot be indexed."""
    f = field_named(name, "index")
    if f.beside:
        raise InvalidFilter("index", f"{name} is enrichment's metadata, kept beside the item: it cannot be indexed")
    return await ledger.create_index(index_name(f, dataset_id), index_sql(f, dataset_id, ledger.db.dialect))


async def indexed_fields(ledger: Ledger, dataset_id: int) -> list[str]:
    """The fields the dataset has an index on, by their public names."""
    by_name = {index_name(f, dataset_id): f.name for f in SYSTEM.values() if f.name != "content_type" and not f.beside}
    suffix = f"_d{int(dataset_id)}"
    out = []
    for name, sql in await ledger.indexes(INDEX_PREFIX):
        if not name.endswith(suffix):
            continue
        if name in by_name:
            out.append(by_name[name])
        elif (start := sql.find("json_extract(meta, '$.\"")) != -1:
            meta = sql[start + len("json_extract(meta, '$.\"") :].split('"', 1)[0]
            out.append(META_PREFIX + meta)
    return sorted(out)
