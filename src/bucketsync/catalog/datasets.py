"""Datasets by their user metadata: ``GET /datasets?filter=&sort=`` and ``bucketsync datasets``
use the items' filter language over a dataset's ``name``, ``created`` and ``metadata.NAME``."""

from __future__ import annotations

from typing import Any

from bucketsync.catalog.query import DATASET_FIELDS, META_NAME, META_PREFIX, compile_filter, parse_sort
from bucketsync.ledger.ledger import Ledger

#: what a dataset's metadata value may be (as for items)
META_VALUE = (str, int, float, bool)


def check_patch(patch: Any) -> dict[str, Any]:
    """A metadata merge-patch, or ValueError naming the bad name or value."""
    if not isinstance(patch, dict):
        raise ValueError('metadata must be a JSON object: {"metadata": {"NAME": value}}')
    for name, value in patch.items():
        if not META_NAME.match(name):
            raise ValueError(f"metadata name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if value is not None and not isinstance(value, META_VALUE):
            raise ValueError(f"metadata {name!r} must be a string, number, boolean or null")
    return patch


async def matching(ledger: Ledger, flt: Any, sort: str | None, among: list[str]) -> list[str]:
    """The names among ``among`` that ``flt`` matches, in ``sort`` order (then by name).

    A dataset the ledger has not met yet has no metadata and sorts by its name, last.
    InvalidFilter names the offending part.
    """
    where = compile_filter(flt if flt is not None else {}, DATASET_FIELDS)
    order = parse_sort(sort, DATASET_FIELDS)
    names = await ledger.select_datasets(where.sql, where.params, order.order_sql(tiebreak="name"))
    wanted = set(among)
    out = [n for n in names if n in wanted]
    if flt is None or flt == {}:
        out += sorted(wanted - set(names))
    return out


def columns(status: dict[str, Any], names: list[str]) -> list[str]:
    """The values of ``names`` (metadata.NAME or a plain NAME of the metadata) for a table row."""
    meta = status.get("metadata") or {}
    out = []
    for name in names:
        value = meta.get(name[len(META_PREFIX) :] if name.startswith(META_PREFIX) else name)
        out.append("" if value is None else str(value))
    return out
