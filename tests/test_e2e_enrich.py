"""`bucketsync enrich` without and with a daemon, and the daemon enriching on its own: real
processes, a real folder, the real API."""

from __future__ import annotations

from pathlib import Path

import pytest

import images
from e2e import Daemon, cli, describe, local_driver, one_json, poll, write_config, write_files

pytestmark = pytest.mark.slow


def test_enrich_cli_in_process_then_through_the_daemon(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    write_files(
        root, {"a.jpg": images.jpeg(orientation=6), "notes.txt": b"hello\n", "broken.jpg": images.truncated_jpeg()}
    )
    cfg = write_config(
        tmp_path,
        {"local": local_driver(root)},
        {"photos": {"driver": "local"}, "plain": {"driver": "local", "enrich": False, "sync": "manual"}},
        extra={"enrich": {"enabled": True, "thumbnail_size": 48, "cache_dir": str(tmp_path / "cache")}},
    )
    with Daemon(cfg) as d:
        d.wait_ready()  # its start-up run indexes the three files; its worker enriches them
        # Whole, as a careful writer puts a file (a poll in the middle of a plain write may index,
        # and enrich, the file empty: done without dimensions, until the next poll sees it grown).
        write_files(tmp_path / "staging", {"new.jpg": images.jpeg(90, 30)})
        (tmp_path / "staging" / "new.jpg").replace(root / "new.jpg")

        def enriched() -> dict[str, object] | None:
            resp = d.api("GET", "/datasets/photos/items/new.jpg")
            system = resp.body.get("system") if resp.status == 200 else None
            return system if system and system["enrichment"] == "done" else None

        system = poll(enriched, what="new.jpg enriched by the daemon's own worker")
        assert (system["width"], system["height"], system["mimetype"]) == (90, 30, "image/jpeg")
        thumb = d.api("GET", "/datasets/photos/items/new.jpg/thumbnail")
        assert thumb.status == 200 and thumb.headers["Content-Type"] == "image/jpeg"
        assert (root / str(system["thumbnail"])).is_file()  # in the hidden folder of the bucket
        a = d.api("GET", "/datasets/photos/items/a.jpg").body["system"]
        assert (a["display_width"], a["display_height"], a["orientation"]) == (40, 60, 6)

        # Through the daemon: --all queues every item again and waits for them.
        proc = cli(cfg, "enrich", "photos", "--all", "--json")
        out = one_json(proc)
        assert (out["queued"], out["done"], out["failed"], out["pending"]) == (4, 3, 1, 0), describe(proc)
        assert proc.returncode == 1  # one item failed

        # the queue gauge follows the recorded results (a scrape may come between the two)
        def settled() -> str | None:
            body = str(d.get("/metrics").body)
            return body if 'bucketsync_enrich_queue{dataset="photos"} 0.0' in body else None

        metrics = poll(settled, what="the enrichment queue gauge back at 0")
        assert 'bucketsync_enrich_total{dataset="photos",result="done"}' in metrics
        items = d.api("GET", "/datasets/photos/items", params={"system.mimetype": "text/plain"}).body["items"]
        assert [i["key"] for i in items] == ["notes.txt"]

    # No daemon: the CLI enriches in its own process.
    proc = cli(cfg, "enrich", "photos", "--failed", "--json")
    out = one_json(proc)
    assert (out["queued"], out["done"], out["failed"], out["pending"]) == (1, 3, 1, 0), describe(proc)
    assert proc.returncode == 1
