"""CSV import: many linked (or uploaded) items from one CSV, streamed.

Columns (a header row names them, in any order; only ``url`` is required):

- ``url``: the item's target, as a linked item's ``ref`` (https://..., s3://...);
- ``name``: its key under the folder (default: the URL's last path segment);
- ``action``: ``link`` (the default) creates a linked item; ``upload`` fetches the URL (through
  the same SSRF-safe fetcher) and puts the bytes into the bucket through the outbox;
- ``mimetype``, ``item_metadata`` (a JSON object), ``item_description`` (stored as the
  ``description`` metadata name).

Items land in a folder named after the CSV (its stem: ``cats.csv`` -> ``cats/``). Each row gets
a result, ``created``, ``exists`` (its key is taken already: importing the same CSV again
creates nothing) or ``failed`` with a reason; a malformed row fails alone. It streams: records
are read as they arrive, link rows are committed in ledger transactions of :data:`BATCH`, and
results go out per batch, so memory does not grow with the CSV.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import json
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import structlog

from bucketsync.catalog import fetch, links
from bucketsync.core.errors import AlreadyExists, BucketsyncError, FetchRefused
from bucketsync.core.keys import check_key
from bucketsync.downstream.outbox import file_chunks

if TYPE_CHECKING:
    from bucketsync.agent import Agent
    from bucketsync.downstream.ops import Downstream

log = structlog.get_logger("bucketsync.imports")

COLUMNS = ("url", "name", "action", "mimetype", "item_metadata", "item_description")
ACTIONS = ("link", "upload")
BATCH = 1000
#: a record longer than this (a quote never closed) fails as one row, and reading goes on
MAX_RECORD = 64 * 1024


@dataclass(slots=True)
class RowResult:
    row: int  # 1 is the first row after the header
    key: str | None
    result: str  # "created", "exists", "failed"
    reason: str | None = None
    action: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"row": self.row, "key": self.key, "action": self.action, "result": self.result, "reason": self.reason}


@dataclass(slots=True)
class Report:
    folder: str
    rows: int = 0
    created: int = 0
    exists: int = 0
    failed: int = 0

    def count(self, r: RowResult) -> None:
        self.rows += 1
        if r.result == "created":
            self.created += 1
        elif r.result == "exists":
            self.exists += 1
        else:
            self.failed += 1

    def as_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "rows": self.rows,
            "created": self.created,
            "exists": self.exists,
            "failed": self.failed,
        }


@dataclass(slots=True)
class Planned:
    """A row that parsed: what to do with it."""

    row: int
    key: str
    action: str
    url: str
    mimetype: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


# -- pure: names, headers, rows ---------------------------------------------------------


def folder_of(csv_name: str) -> str:
    """The folder a CSV's items land in: its file name's stem, as a key ("" never)."""
    stem = PurePosixPath(csv_name.replace("\\", "/")).name
    stem = stem[: -len(".csv")] if stem.lower().endswith(".csv") else stem
    if not stem:
        raise ValueError(f"the CSV's name {csv_name!r} gives no folder name")
    return check_key(stem) + "/"


def header(fields: list[str]) -> dict[str, int]:
    """Column name -> index, or ValueError naming the unknown or missing columns."""
    names = [f.strip().lower() for f in fields]
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(map(repr, unknown))}; the columns are {', '.join(COLUMNS)}")
    if "url" not in names:
        raise ValueError(f"the header must name a url column (the columns are {', '.join(COLUMNS)})")
    if len(set(names)) != len(names):
        raise ValueError("a column is named twice in the header")
    return {n: i for i, n in enumerate(names)}


def plan(row: int, fields: list[str], cols: dict[str, int], folder: str, check: Any) -> Planned | RowResult:
    """What one record asks for, or its failure; ``check`` vets a URL (``links.check_ref``)."""

    def get(name: str) -> str:
        i = cols.get(name)
        return fields[i].strip() if i is not None and i < len(fields) else ""

    if len(fields) > len(cols):
        return RowResult(row, None, "failed", f"{len(fields)} fields, but the header has {len(cols)} columns")
    url, action = get("url"), get("action").lower() or "link"
    if action not in ACTIONS:
        return RowResult(row, None, "failed", f"action {action!r} is not one of {', '.join(ACTIONS)}")
    try:
        if not url:
            raise ValueError("url is empty")
        name = get("name") or unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
        if not name:
            raise ValueError("no name, and the url's path has no last segment to name it by")
        key = links.link_key(folder + name) if action == "link" else check_key(folder + name)
        meta: dict[str, Any] = {}
        if raw := get("item_metadata"):
            try:
                meta = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"item_metadata is not JSON ({exc})") from None
            meta = dict(links.check_metadata(meta, "item_metadata"))
        if desc := get("item_description"):
            meta["description"] = desc
        mimetype = links.check_mimetype(get("mimetype"))
        check(url)
    except (ValueError, FetchRefused) as exc:
        return RowResult(row, None, "failed", str(exc), action)
    return Planned(row, key, action, url, mimetype, meta)


async def records(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[str] | str]:
    """The CSV's records as they arrive: a list of fields, or (a string) why one is unreadable.

    A record may span lines inside quotes: lines are joined until the quotes balance (``""``
    inside a quoted field counts twice, so the count stays even), and never past
    :data:`MAX_RECORD`. A UTF-8 byte order mark is skipped; bad UTF-8 becomes U+FFFD.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    tail, pending = "", ""
    skipping = False  # the rest of a line too long to keep is dropped up to its end

    def parse(record: str) -> list[str] | str:
        try:
            return next(csv.reader([record]), [])
        except csv.Error as exc:
            return f"not CSV: {exc}"

    async for chunk in chunks:
        text = tail + decoder.decode(chunk)
        if skipping:
            if "\n" not in text:
                tail = ""
                continue
            text, skipping = text.split("\n", 1)[1], False
        lines = text.split("\n")
        tail = lines.pop()
        for line in lines:
            pending += line + "\n"
            if pending.count('"') % 2 == 0:
                yield parse(pending.rstrip("\r\n"))
                pending = ""
            elif len(pending) > MAX_RECORD:
                yield f"a record longer than {MAX_RECORD} bytes (a quote never closed?)"
                pending = ""
        if len(tail) > MAX_RECORD:
            yield f"a line longer than {MAX_RECORD} bytes"
            tail, pending, skipping = "", "", True
    pending += tail + decoder.decode(b"", final=True)
    if pending.strip():
        yield parse(pending.rstrip("\r\n"))


# -- the import ---------------------------------------------------------------------------


class Import:
    """One CSV import into a synced dataset: ``await start()`` reads the header (ValueError
    on a bad one, before anything is created), then ``batches()`` yields the results."""

    def __init__(self, agent: Agent, downstream: Downstream, dataset: str, csv_name: str) -> None:
        self.agent = agent
        self.downstream = downstream
        self.dataset = dataset
        self.folder = folder_of(csv_name)
        self.report = Report(self.folder)
        self.policy = fetch.Policy.of(agent.settings.links)
        self._records: AsyncIterator[list[str] | str] | None = None
        self._cols: dict[str, int] = {}
        self._checked: set[str] = set()

    async def start(self, chunks: AsyncIterable[bytes]) -> None:
        self._records = records(chunks)
        first = await anext(self._records, None)
        if first is None:
            raise ValueError("the CSV is empty: it needs a header row (url,name,action,...)")
        if isinstance(first, str):
            raise ValueError(f"the header row is unreadable: {first}")
        self._cols = header(first)

    def _check(self, url: str) -> None:
        """``links.check_ref``, remembered per scheme and authority for https refs: what it
        checks of them is all before the path, and a CSV's rows mostly share a few hosts."""
        start = url.find("://") + 3
        end = url.find("/", start) if start > 2 else -1
        head = url[:end] if end > 0 and url[:start].lower() not in links.CLOUD_PREFIXES else None
        if head is not None and head in self._checked:
            return
        links.check_ref(url, self.agent.settings, self.policy)
        if head is not None:
            if len(self._checked) >= 1024:
                self._checked.clear()
            self._checked.add(head)

    async def batches(self) -> AsyncIterator[list[RowResult]]:
        """Results in row order, one list per ledger transaction (or per upload)."""
        assert self._records is not None
        ledger = self.agent.ledger
        assert ledger is not None
        ds_id = await ledger.dataset_id(self.dataset)
        out: list[RowResult] = []
        todo: list[Planned] = []
        n = 0
        async for rec in self._records:
            n += 1
            if isinstance(rec, str):
                out.append(RowResult(n, None, "failed", rec))
            elif not any(f.strip() for f in rec):
                n -= 1  # a blank line is no row
                continue
            else:
                planned = plan(n, rec, self._cols, self.folder, self._check)
                if isinstance(planned, RowResult):
                    out.append(planned)
                elif planned.action == "link":
                    todo.append(planned)
                else:
                    out += await self._link_rows(ds_id, todo)
                    todo = []
                    out.append(await self._upload(planned))
            if len(out) + len(todo) >= BATCH:
                out += await self._link_rows(ds_id, todo)
                todo = []
                yield self._counted(out)
                out = []
        out += await self._link_rows(ds_id, todo)
        if out:
            yield self._counted(out)
        await self.agent.refresh_item_gauges(self.dataset)
        log.info("csv imported", dataset=self.dataset, **self.report.as_json())

    def _counted(self, results: list[RowResult]) -> list[RowResult]:
        results.sort(key=lambda r: r.row)
        for r in results:
            self.report.count(r)
        return results

    async def _link_rows(self, ds_id: int, todo: list[Planned]) -> list[RowResult]:
        """Create a batch of linked items in one transaction; a key met twice in it is ``exists``."""
        if not todo:
            return []
        ledger = self.agent.ledger
        assert ledger is not None
        out: list[RowResult] = []
        first: dict[str, int] = {}
        fresh: list[Planned] = []
        for p in todo:
            if p.key in first:
                out.append(RowResult(p.row, p.key, "exists", f"same name as row {first[p.key]}", "link"))
            else:
                first[p.key] = p.row
                fresh.append(p)
        room = await links.quota_room(self.agent, self.dataset, ds_id, len(fresh))
        if room < len(fresh):
            quota = self.agent.settings.datasets[self.dataset].quota
            out += [
                RowResult(p.row, p.key, "failed", f"the dataset is at its quota of {quota} items", "link")
                for p in fresh[room:]
            ]
            fresh = fresh[:room]
        existed = await ledger.add_links(ds_id, [(p.key, p.url, p.mimetype, p.metadata) for p in fresh])
        for p in fresh:
            out.append(RowResult(p.row, p.key, "exists" if p.key in existed else "created", None, "link"))
        return out

    async def _upload(self, p: Planned) -> RowResult:
        """Fetch the URL and put it into the bucket through the outbox (create-only)."""
        ledger = self.agent.ledger
        assert ledger is not None
        ds_id = await ledger.dataset_id(self.dataset)
        if await ledger.item(ds_id, p.key) is not None:
            return RowResult(p.row, p.key, "exists", None, "upload")
        # Fetched to a file first: the fetch's time cap is the fetch's, not the outbox's settling too.
        staging = self.downstream.outbox.staging
        await asyncio.to_thread(staging.mkdir, parents=True, exist_ok=True)
        body = staging / f"import-{uuid.uuid4().hex}.part"
        try:
            async with links.open_target(self.agent, p.url) as target:
                ctype = p.mimetype or (target.content_type or "").split(";")[0].strip() or None
                with await asyncio.to_thread(open, body, "wb") as f:
                    async for chunk in target.chunks:
                        await asyncio.to_thread(f.write, chunk)
            out = await self.downstream.put(self.dataset, p.key, file_chunks(str(body)), content_type=ctype)
        except AlreadyExists:
            return RowResult(p.row, p.key, "exists", None, "upload")
        except BucketsyncError as exc:
            return RowResult(p.row, p.key, "failed", str(exc), "upload")
        finally:
            await asyncio.to_thread(body.unlink, missing_ok=True)
        if p.metadata and out.item is not None:
            await ledger.merge_meta(out.item.id, p.metadata)
        reason = None if out.result != "pending" else f"the upload is queued as op {out.op.id if out.op else '?'}"
        return RowResult(p.row, p.key, "created", reason, "upload")
