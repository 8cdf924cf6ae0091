"""CSV import (catalog/imports.py) in process: records as they arrive, rows planned one by one,
and 100,000 rows imported at flat memory into a real ledger file. End to end (the daemon, the
CLI, uploads over TLS) in test_e2e_links.py."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bucketsync.agent import Agent
from bucketsync.catalog import imports
from bucketsync.catalog.fetch import Policy
from bucketsync.config import Settings
from bucketsync.downstream.ops import Downstream


async def chunked(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    """A body in small chunks, so records and UTF-8 characters straddle them."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def all_records(data: bytes) -> list[Any]:
    return [r async for r in imports.records(chunked(data))]


async def test_records_join_quoted_lines_and_survive_chunk_boundaries() -> None:
    data = '\ufeffurl,name\r\n"https://a/x","line one\nline two"\nhttps://b/ü,"say ""hi"""\n\nlast,row'.encode()
    assert await all_records(data) == [
        ["url", "name"],
        ["https://a/x", "line one\nline two"],
        ["https://b/ü", 'say "hi"'],
        [],
        ["last", "row"],
    ]


async def test_a_quote_never_closed_fails_as_one_record_and_reading_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imports, "MAX_RECORD", 100)
    data = b'url\n"https://a/x\n' + b"more lines\n" * 12 + b"https://b/ok\n"
    got = await all_records(data)
    assert [r for r in got if isinstance(r, str)] == ["a record longer than 100 bytes (a quote never closed?)"]
    assert got[-1] == ["https://b/ok"]
    data = b"url\nhttps://a/" + b"x" * 300 + b"\nhttps://b/ok\n"  # one line too long: it alone fails
    assert await all_records(data) == [["url"], "a line longer than 100 bytes", ["https://b/ok"]]


def test_the_folder_is_the_csv_stem_and_the_header_is_checked() -> None:
    assert imports.folder_of("cats.csv") == "cats/"
    assert imports.folder_of("/home/me/Dogs 2024.CSV") == "Dogs 2024/"
    with pytest.raises(ValueError, match="no folder name"):
        imports.folder_of(".csv")
    assert imports.header(["URL", " name ", "action"]) == {"url": 0, "name": 1, "action": 2}
    with pytest.raises(ValueError, match=r"unknown column.*'size'"):
        imports.header(["url", "size"])
    with pytest.raises(ValueError, match="url column"):
        imports.header(["name"])


def test_each_malformed_row_fails_alone_with_its_reason() -> None:
    cols = imports.header(["url", "name", "action", "mimetype", "item_metadata", "item_description"])

    def check(url: str) -> None:
        from bucketsync.catalog import fetch

        fetch.check_url(url, Policy())

    def plan(*fields: str) -> Any:
        return imports.plan(1, list(fields), cols, "f/", check)

    ok = plan("https://e.com/a/cat.jpg", "", "", "image/jpeg", '{"n": 1}', "a cat")
    assert isinstance(ok, imports.Planned)
    assert (ok.key, ok.action, ok.mimetype, ok.metadata) == (
        "f/cat.jpg",
        "link",
        "image/jpeg",
        {"n": 1, "description": "a cat"},
    )
    for fields, reason in (
        (("https://e.com/a", "x", "copy"), "action 'copy'"),
        (("", "x"), "url is empty"),
        (("https://e.com/", ""), "no name"),
        (("https://e.com/a", "../up"), "'..'"),
        (("https://e.com/a", "x", "link", "", "{not json"), "item_metadata is not JSON"),
        (("https://e.com/a", "x", "link", "", '{"bad name": 1}'), "bad name"),
        (("https://e.com/a", "x", "link", "", "[1]"), "JSON object"),
        (("https://e.com/a", "x", "link", "nonsense"), "mimetype"),
        (("http://e.com/a", "x"), "scheme"),
        (("https://e.com/a", "x.link.json"), ".link.json"),
        (("https://e.com/a", "x", "link", "", "", "", "extra"), "7 fields"),
    ):
        got = plan(*fields)
        assert isinstance(got, imports.RowResult) and got.result == "failed", fields
        assert reason in (got.reason or ""), (fields, got.reason)


ROWS = 100_000


async def big_csv(rows: int) -> AsyncIterator[bytes]:
    """A CSV made as it is read: nothing of it is held but the chunk being sent."""
    yield b"url,name,item_metadata\n"
    chunk: list[str] = []
    for i in range(rows):
        chunk.append(f'https://cdn.example.com/img/{i}.jpg,img-{i:06}.jpg,"{{""n"": {i}}}"\n')
        if len(chunk) == 500:
            yield "".join(chunk).encode()
            chunk = []
    yield "".join(chunk).encode()


def rss() -> int:
    """This process's resident memory now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_100k_rows_import_at_flat_memory(tmp_path: Path) -> None:
    folder = tmp_path / "bucket"
    folder.mkdir()
    settings = Settings(
        agent={"ledger": str(tmp_path / "var" / "ledger.db")},
        drivers={"d": {"url": folder.as_uri()}},
        datasets={"photos": {"driver": "d", "sync": "manual"}},
    )
    async with Agent(settings) as agent:
        job = imports.Import(agent, Downstream(agent, agent.outbox, in_process=True), "photos", "big.csv")
        await job.start(big_csv(ROWS))
        # RSS at each batch, from the 10th on (imports, caches and SQLite's page cache are warm by
        # then): held rows would make it grow with every batch (100,000 results alone are ~20 MB);
        # streamed, it stays where it was (0.4 MB measured). Sampling RSS costs nothing per row,
        # where tracemalloc's tracing of every allocation slowed this import fivefold.
        samples: list[int] = []
        n = 0
        async for batch in job.batches():
            assert len(batch) <= imports.BATCH
            n += len(batch)
            samples.append(rss())
        assert n == ROWS
        report = job.report
        assert (report.rows, report.created, report.exists, report.failed) == (ROWS, ROWS, 0, 0)
        growth = max(samples[10:]) - samples[10]
        assert growth < 8 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB over {ROWS} rows"
        assert agent.ledger is not None
        ds_id = await agent.ledger.dataset_id("photos")
        assert await agent.ledger.live_count(ds_id) == ROWS
        item = await agent.ledger.item(ds_id, "big/img-042042.jpg")
        assert item is not None and item.ref == "https://cdn.example.com/img/42042.jpg" and item.meta == {"n": 42042}
        assert item.link == "api"
