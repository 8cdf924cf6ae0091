"""The catalog's filter language, compiled to parameterised SQL by pure functions.

A filter is a JSON object. Each member is either a field and its condition, or
``$and`` / ``$or`` with a list of filters; several members are all required::

    {"size": {"$gte": 1024}, "metadata.camera": "x100",
     "$or": [{"key": {"$prefix": "2024/"}}, {"metadata.iso": {"$in": [100, 200]}}]}

A condition is a bare value (``$eq``) or an object of operators, all required:
``$eq $ne $gt $gte $lt $lte $in $exists $prefix``. Fields are the system fields
(:data:`SYSTEM`) and ``metadata.NAME`` for user metadata.

Why the SQL text holds field expressions but never a value: every value is a bound
parameter. A field becomes either a fixed column name from :data:`SYSTEM` or
``json_extract(meta, '$."NAME"')`` with a NAME that matched ``META_NAME``
(``[A-Za-z0-9_.-]``, no quote can get through). The path has to be literal SQL: an
expression index (see :func:`index_sql`) serves only a query whose expression is
*textually* the one indexed, and a bound path never is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bucketsync.core.errors import InvalidFilter

if TYPE_CHECKING:
    from bucketsync.ledger.db import Dialect

#: user metadata names, as ``PATCH .../items/{key}`` accepts them
META_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
META_PREFIX = "metadata."

#: the end of every key that starts with a prefix (as the ledger's prefix scans use)
_PREFIX_END = "\U0010ffff"
MAX_DEPTH = 8
MAX_CONDITIONS = 100
MAX_IN = 1000
OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$exists", "$prefix")


@dataclass(frozen=True, slots=True)
class Field:
    """One filterable, sortable field: its public name, its SQL expression, its kind.

    ``kind`` says which values make sense: ``text``, ``number``, ``time`` (POSIX
    seconds in the ledger; ISO 8601 or a number in a filter), ``state``, or ``any``
    (user metadata: strings, numbers and booleans side by side).
    """

    name: str
    sql: str
    kind: str
    nullable: bool = False
    #: kept beside the item (enrichment's system metadata), not in its row: no index can
    #: hold it, and a cursor reads it back from the enrichment (catalog/items.py)
    beside: bool = False


def _enriched(name: str, kind: str) -> Field:
    """A member of the item's enrichment (enrich/), as a correlated subquery on its row."""
    sql = f"(SELECT json_extract(meta, '$.\"{name}\"') FROM enrichment WHERE item_id = items.id)"
    return Field(name, sql, kind, nullable=True, beside=True)


#: the system fields; ``mimetype`` is the item's content type under the name users know
SYSTEM: dict[str, Field] = {
    f.name: f
    for f in (
        Field("id", "id", "number"),
        Field("key", "key", "text"),
        Field("size", "size", "number"),
        Field("modified", "modified", "time"),
        Field("updated", "updated", "time"),
        Field("etag", "etag", "text", nullable=True),
        Field("version", "version", "text", nullable=True),
        Field("state", "state", "state"),
        Field("mimetype", "content_type", "text", nullable=True),
        Field("content_type", "content_type", "text", nullable=True),
        # linked items (catalog/links.py): ``{"link": {"$exists": true}}`` finds them
        Field("link", "link", "text", nullable=True),
        Field("ref", "ref", "text", nullable=True),
        # enrichment's system metadata (docs/enrichment.md): missing until an item is enriched
        *(_enriched(n, "number") for n in ("width", "height", "orientation", "display_width", "display_height")),
        *(_enriched(n, "text") for n in ("format", "encoding")),
        # a video's (enrich/video.py): seconds, frames per second, clockwise degrees; FFmpeg's codec name
        *(_enriched(n, "number") for n in ("duration", "frame_rate", "rotation")),
        _enriched("codec", "text"),
    )
}
#: the fields of a dataset (``GET /datasets?filter=``), besides its metadata.NAME
DATASET_FIELDS: dict[str, Field] = {
    f.name: f for f in (Field("name", "name", "text"), Field("created", "created", "time"))
}
#: the item states a ``state`` condition may name
STATES = ("live", "tombstone", "orphaned", "stale")


def field(name: Any, at: str = "", fields: Mapping[str, Field] = SYSTEM) -> Field:
    """The field called ``name`` among ``fields`` (the items' system fields by default) or
    user metadata, else InvalidFilter naming it and what is allowed."""
    if not isinstance(name, str):
        raise InvalidFilter(at, "a field name must be a string")
    if (known := fields.get(name)) is not None:
        return known
    if name.startswith(META_PREFIX):
        meta = name[len(META_PREFIX) :]
        if not META_NAME.match(meta):
            raise InvalidFilter(at or name, f"{meta!r} is no metadata name (1-64 of A-Z a-z 0-9 _ . -)")
        return Field(name, f"json_extract(meta, '$.\"{meta}\"')", "any", nullable=True)
    raise InvalidFilter(
        at or name,
        f"unknown field {name!r}; system fields are {', '.join(fields)}, user metadata is metadata.NAME",
    )


# -- the filter ----------------------------------------------------------------------


@dataclass(slots=True)
class Compiled:
    """A SQL boolean expression over the ``items`` row and its bound parameters."""

    sql: str
    params: list[Any]
    #: it holds the sort field to one value (a cursor's ties): key order is the sort order
    pins: bool = False


def compile_filter(doc: Any, fields: Mapping[str, Field] = SYSTEM) -> Compiled:
    """The filter document as one SQL expression (``TRUE`` for an empty filter) over a row
    with ``fields`` and a ``meta`` JSON column (items by default; datasets pass theirs).

    Pure: the same document gives the same SQL, and no value of it is ever in the text.
    """
    budget = [MAX_CONDITIONS]
    return _group(doc, "", 0, budget, fields)


def _group(doc: Any, at: str, depth: int, budget: list[int], fields: Mapping[str, Field]) -> Compiled:
    if not isinstance(doc, dict):
        raise InvalidFilter(at or "$", "a filter must be a JSON object")
    if depth > MAX_DEPTH:
        raise InvalidFilter(at, f"filters nest at most {MAX_DEPTH} deep")
    parts: list[Compiled] = []
    for name, value in doc.items():
        here = f"{at}.{name}" if at else name
        if name in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise InvalidFilter(here, f"{name} takes a non-empty list of filters")
            subs = [_group(sub, f"{here}[{i}]", depth + 1, budget, fields) for i, sub in enumerate(value)]
            parts.append(_join(subs, " AND " if name == "$and" else " OR "))
        elif name.startswith("$"):
            raise InvalidFilter(here, f"unknown operator {name!r} here; a filter's members are fields, $and or $or")
        else:
            parts.append(_condition(field(name, here, fields), value, here, budget))
    if not parts:
        return Compiled("TRUE", [])
    return _join(parts, " AND ")


def _join(parts: list[Compiled], op: str) -> Compiled:
    if len(parts) == 1:
        return parts[0]
    return Compiled("(" + op.join(p.sql for p in parts) + ")", [x for p in parts for x in p.params])


def _condition(f: Field, cond: Any, at: str, budget: list[int]) -> Compiled:
    if not isinstance(cond, dict):
        cond = {"$eq": cond}
    if not cond:
        raise InvalidFilter(at, 'an empty condition; give a value or operators such as {"$gt": 1}')
    parts = []
    for op, value in cond.items():
        here = f"{at}.{op}"
        budget[0] -= 1
        if budget[0] < 0:
            raise InvalidFilter(here, f"a filter has at most {MAX_CONDITIONS} conditions")
        parts.append(_operator(f, op, value, here))
    return _join(parts, " AND ")


_CMP = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def _operator(f: Field, op: str, value: Any, at: str) -> Compiled:
    col = f.sql
    if op == "$eq":
        if value is None:
            return Compiled(f"{col} IS NULL", [])
        return Compiled(f"{col} = ?", [_value(f, value, at)])
    if op == "$ne":
        if value is None:
            return Compiled(f"{col} IS NOT NULL", [])
        # IS DISTINCT FROM: an item without the field is "not equal" too (a missing name is not the value)
        return Compiled(f"{col} IS DISTINCT FROM ?", [_value(f, value, at)])
    if op in _CMP:
        if value is None or isinstance(value, bool) or f.kind == "state":
            raise InvalidFilter(at, f"{op} compares with a number or a string, not {json.dumps(value)}")
        return Compiled(f"{col} {_CMP[op]} ?", [_value(f, value, at)])
    if op == "$in":
        if not isinstance(value, list) or not value or len(value) > MAX_IN:
            raise InvalidFilter(at, f"$in takes a list of 1 to {MAX_IN} values")
        values = [_value(f, v, f"{at}[{i}]") for i, v in enumerate(value)]
        return Compiled(f"{col} IN ({', '.join('?' * len(values))})", values)
    if op == "$exists":
        if not isinstance(value, bool):
            raise InvalidFilter(at, "$exists takes true or false")
        return Compiled(f"{col} IS {'NOT ' if value else ''}NULL", [])
    if op == "$prefix":
        if not isinstance(value, str) or f.kind not in ("text", "any"):
            raise InvalidFilter(at, f"$prefix takes a string and a text field ({f.name} is {f.kind})")
        if not value:
            return Compiled(f"{col} >= ?", [""])  # every string
        # A range, not LIKE: it uses an index on the field, and '%' or '_' mean themselves.
        return Compiled(f"({col} >= ? AND {col} < ?)", [value, value + _PREFIX_END])
    raise InvalidFilter(at, f"unknown operator {op!r}; operators are {' '.join(OPERATORS)}")


def _value(f: Field, value: Any, at: str) -> Any:
    """A JSON value as the ledger stores the field (bound, never in the SQL text)."""
    if isinstance(value, (dict, list)):
        raise InvalidFilter(at, "a value must be a string, number, boolean or null")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidFilter(at, "a number must be finite")
    if f.kind == "any":
        return int(value) if isinstance(value, bool) else value  # JSON true is 1 in json_extract
    if f.kind == "state":
        if value not in STATES:
            raise InvalidFilter(at, f"state is one of {', '.join(STATES)}, not {json.dumps(value)}")
        return value
    if f.kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidFilter(at, f"{f.name} is a number, not {json.dumps(value)}")
        return value
    if f.kind == "time":
        return _time(value, f, at)
    if not isinstance(value, str):
        raise InvalidFilter(at, f"{f.name} is a string, not {json.dumps(value)}")
    return value


def _time(value: Any, f: Field, at: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                raise InvalidFilter(at, f"{f.name}: {value!r} needs a time zone (Z or +HH:MM)")
            return parsed.timestamp()
    raise InvalidFilter(at, f"{f.name} is a time: ISO 8601 with a zone, or POSIX seconds; not {json.dumps(value)}")


def parse_filter(raw: str) -> Any:
    """The ``filter`` query parameter's JSON, or InvalidFilter saying where it broke."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidFilter("$", f"not JSON ({exc.msg} at character {exc.pos})") from None


# -- sort and the cursor ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sort:
    """Order by one field, then by key (unique in a dataset), both in one direction."""

    field: Field
    desc: bool = False

    @property
    def by_key(self) -> bool:
        return self.field.sql == "key"

    def order_sql(self, pinned: bool = False, tiebreak: str = "key") -> str:
        """ORDER BY, then by ``tiebreak`` (an item's key, a dataset's name); ``pinned`` when the
        filter holds the field to one value: then key order is the same order, and SQLite
        walks the field's index without sorting the matches."""
        way = " DESC" if self.desc else ""
        if self.by_key or pinned:
            return f"key{way}"
        # A missing value sorts first ascending and last descending, as SQLite does unasked and
        # the keyset cursor (``after_sql``) counts on; PostgreSQL does the opposite unless told.
        # The clause states SQLite's own default, so its planner still walks the field's index.
        nulls = (" NULLS LAST" if self.desc else " NULLS FIRST") if self.field.nullable else ""
        return f"{self.field.sql}{way}{nulls}, {tiebreak}{way}"


def fields_of(doc: Any, fields: Mapping[str, Field] = SYSTEM) -> list[Field]:
    """Every field a (valid) filter names, at any depth."""
    out: list[Field] = []
    if isinstance(doc, dict):
        for name, value in doc.items():
            if name in ("$and", "$or") and isinstance(value, list):
                for sub in value:
                    out += fields_of(sub, fields)
            elif not name.startswith("$"):
                out.append(field(name, name, fields))
    return out


def pinned(doc: Any, f: Field) -> bool:
    """Whether the filter's top level holds ``f`` to one value (``f: v`` or ``{"$eq": v}``, v not null)."""
    if not isinstance(doc, dict):
        return False
    for name, cond in doc.items():
        if name.startswith("$") or field(name, name).sql != f.sql:
            continue
        value = cond.get("$eq") if isinstance(cond, dict) else cond
        if value is not None and not isinstance(value, (dict, list)):
            return True
    return False


def excludes_null(doc: Any, f: Field) -> bool:
    """Whether the filter's top level leaves out the items without ``f`` (a comparison, a
    value, ``$in``, ``$prefix``, ``$exists: true`` or ``$ne: null`` on it): then a sort on
    ``f`` has no missing values to page through, and no query need look for them."""
    if not isinstance(doc, dict):
        return False
    for name, cond in doc.items():
        if name.startswith("$") or field(name, name).sql != f.sql:
            continue
        if not isinstance(cond, dict):
            if cond is not None:
                return True
            continue
        for op, value in cond.items():
            if op in (*_CMP, "$in", "$prefix") or (op == "$eq" and value is not None):
                return True
            if (op == "$exists" and value is True) or (op == "$ne" and value is None):
                return True
    return False


def field_pattern(fields: Mapping[str, Field] = SYSTEM) -> str:
    """A regular expression of every field name (for the API document)."""
    return "(?:" + "|".join(re.escape(n) for n in fields) + r"|metadata\.[A-Za-z0-9_.-]{1,64})"


def sort_pattern(fields: Mapping[str, Field] = SYSTEM) -> str:
    """A regular expression of every ``sort`` value, the empty default included."""
    return f"^(?:-?{field_pattern(fields)})?$"


def parse_sort(raw: str | None, fields: Mapping[str, Field] = SYSTEM) -> Sort:
    """``FIELD`` ascending or ``-FIELD`` descending; the default is by key (by name for datasets)."""
    if not raw:
        return Sort(next(iter(fields.values())) if fields is not SYSTEM else SYSTEM["key"])
    desc = raw.startswith("-")
    return Sort(field(raw[1:] if desc else raw, "sort", fields), desc)


def encode_cursor(sort: Sort, value: Any, key: str) -> str:
    """Where the next page starts: the last item's key (sorted by key) or its (value, key)."""
    payload = key if sort.by_key else json.dumps([value, key], ensure_ascii=False, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_cursor(sort: Sort, cursor: str) -> tuple[Any, str]:
    """(value, key) to continue after; InvalidFilter naming ``cursor`` when it does not fit ``sort``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        raise InvalidFilter("cursor", "not a cursor this API handed out") from None
    if sort.by_key:
        return raw, raw
    wrong = InvalidFilter("cursor", "not a cursor of this sort order (pass the same sort as the first page)")
    try:
        value, key = json.loads(raw)
    except (ValueError, TypeError):
        raise wrong from None
    if not isinstance(key, str) or isinstance(value, (dict, list)):
        raise wrong
    return value, key


def after_sql(sort: Sort, value: Any, key: str, *, seek: bool = True, nulls: bool = True) -> list[Compiled]:
    """Keyset pagination: the rows strictly after (value, key) in ``sort`` order, as
    conditions to query one after another (each in ``sort`` order) until a page is full.

    SQLite orders NULL (a missing metadata name) first ascending and last descending,
    and compares values of different types in the order it sorts them (numbers before
    text), so a comparison on the bound value continues exactly where the sort left off.
    The NULLs are a segment of their own: an ``OR col IS NULL`` would keep SQLite from
    bounding its index range scan, and every page would walk the index from its start.
    """
    if sort.by_key:
        return [Compiled("key < ?" if sort.desc else "key > ?", [key])]
    col = sort.field.sql
    if value is None:
        if sort.desc:
            return [Compiled(f"({col} IS NULL AND key < ?)", [key])]
        return [Compiled(f"({col} IS NULL AND key > ?)", [key]), Compiled(f"{col} IS NOT NULL", [])]
    # Descending, the missing values come last. ``nulls=False`` when the filter leaves them
    # out: a query for them would walk the filter's whole range to find none.
    missing = [Compiled(f"{col} IS NULL", [])] if sort.desc and nulls else []
    # Through an index (``seek``): the ties of x after y first, then the values beyond x,
    # two index seeks, where one condition "a >= x AND (a > x OR k > y)" stepped over the
    # ties before y one by one (SQLite 3.40 uses no row value on an expression index).
    # Without one, every query is a scan of the dataset's rows: one condition, one scan.
    op = "<" if sort.desc else ">"
    if not seek:
        return [Compiled(f"({col} {op} ? OR ({col} = ? AND key {op} ?))", [value, value, key]), *missing]
    return [
        Compiled(f"({col} = ? AND key {op} ?)", [value, key], pins=True),
        Compiled(f"{col} {op} ?", [value]),
        *missing,
    ]


# -- expression indexes -------------------------------------------------------------------


def index_name(f: Field, dataset_id: int) -> str:
    """A stable name for one dataset's index on ``f``'s expression (``mimetype`` and
    ``content_type`` share one); the hash keeps metadata names that differ only in '.',
    '-' or case apart."""
    base = "meta_" + f.name[len(META_PREFIX) :] if f.kind == "any" else f.sql
    slug = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")[:40]
    return f"items_by_{slug}_{hashlib.sha1(f.sql.encode()).hexdigest()[:8]}_d{int(dataset_id)}"


def index_sql(f: Field, dataset_id: int, dialect: Dialect) -> str:
    """``CREATE INDEX`` on (dataset, the field's expression, key) over one dataset's rows (a
    partial index): it serves a filter on the field and its sort order with the key
    tiebreak, and costs nothing to the other datasets' writes (a clone of a million items
    included). SQLite uses a partial index only when the query names the dataset by the
    same literal, so ``Ledger.select_items`` writes the (integer) dataset id into its SQL;
    the leading dataset column makes the planner prefer it to the (dataset, key) index."""
    ds = int(dataset_id)
    cols = f"dataset_id, {dialect.index_term(f.sql, f.nullable)}, key"
    return f"CREATE INDEX IF NOT EXISTS {index_name(f, ds)} ON items ({cols}) WHERE dataset_id = {ds}"
