"""The catalog end to end: one real daemon (module-scoped) over a local folder and a
SeaweedFS bucket, driven through HTTP and the CLI as a user would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from e2e import Daemon, cli, describe, json_lines, local_driver, parallel, write_config, write_files
from emulators.s3 import PREFIX, REGION, S3Emulator

FILES = {"a/1.jpg": b"1" * 10, "a/2.jpg": b"2" * 20, "a/3.png": b"3" * 30, "b/1.jpg": b"4" * 40, "b/2.txt": b"5"}
META = {
    "a/1.jpg": {"camera": "x100", "iso": 200},
    "a/2.jpg": {"camera": "x100", "iso": 400},
    "a/3.png": {"camera": "gr3", "iso": 100},
    "b/1.jpg": {"camera": "gr3"},
}
DATASETS = ("local", "cloud")


@dataclass
class Catalog:
    daemon: Daemon
    config: Path


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, seaweedfs: S3Emulator) -> Iterator[Catalog]:
    root = tmp_path_factory.mktemp("catalog")
    write_files(root / "files", FILES)
    bucket = seaweedfs.new_bucket()
    for key, body in FILES.items():
        seaweedfs.client().put_object(Bucket=bucket, Key=PREFIX + key, Body=body)
    integrations = {
        "aws_test": {
            "kind": "aws",
            "access_key_id": seaweedfs.access_key_id,
            "secret_access_key": seaweedfs.secret_access_key,
        }
    }
    s3 = {"url": f"s3://{bucket}/{PREFIX}", "integration": "aws_test", "endpoint_url": seaweedfs.endpoint_url}
    config = write_config(
        root,
        {"files": local_driver(root / "files"), "bucket": {**s3, "region": REGION}},
        {
            "local": {"driver": "files", "sync": "manual", "indexes": ["metadata.camera"]},
            "cloud": {"driver": "bucket", "sync": "manual"},
        },
        integrations,
    )
    with Daemon(config) as daemon:
        for ds in DATASETS:
            run = daemon.api("POST", f"/datasets/{ds}/sync", params={"wait": "true"})
            assert run.status == 200 and run.body["status"] == "ok", run.body
            for key, meta in META.items():
                r = daemon.api("PATCH", f"/datasets/{ds}/items/{quote(key, safe='')}", json_body={"metadata": meta})
                assert r.status == 200, r.body
        yield Catalog(daemon, config)


def page(c: Catalog, ds: str, **params: Any) -> tuple[list[str], str | None]:
    query = {k: json.dumps(v) if k == "filter" else str(v) for k, v in params.items()}
    r = c.daemon.api("GET", f"/datasets/{ds}/items", params=query)
    assert r.status == 200, r.body
    return [i["key"] for i in r.body["items"]], r.body["next_cursor"]


@pytest.mark.parametrize("ds", DATASETS)
def test_filters_sorts_and_pages_through_the_api(catalog: Catalog, ds: str) -> None:
    assert page(catalog, ds, filter={"metadata.camera": "x100"})[0] == ["a/1.jpg", "a/2.jpg"]
    assert page(catalog, ds, filter={"size": {"$gte": 30}, "key": {"$prefix": "a/"}})[0] == ["a/3.png"]
    assert page(catalog, ds, filter={"metadata.iso": {"$exists": False}})[0] == ["b/1.jpg", "b/2.txt"]
    assert page(catalog, ds, filter={"$or": [{"metadata.iso": {"$in": [100, 400]}}, {"size": {"$lt": 2}}]})[0] == [
        "a/2.jpg",
        "a/3.png",
        "b/2.txt",
    ]
    # sorted by a metadata field, descending, one item a page: the cursor walks it all
    walked: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"sort": "-metadata.iso", "limit": 1} | ({"cursor": cursor} if cursor else {})
        keys, cursor = page(catalog, ds, **params)
        walked += keys
        if cursor is None:
            break
    assert walked == ["a/2.jpg", "a/1.jpg", "a/3.png", "b/2.txt", "b/1.jpg"]


@pytest.mark.parametrize(
    ("flt", "at"),
    [
        ('{"size": {"$gt": "big"}}', "size.$gt"),
        ('{"$and": [{"size": 1}, {"colour": "red"}]}', "$and[1].colour"),
        ("{size: 1}", "$"),
    ],
)
def test_a_bad_filter_is_a_400_naming_the_offending_part(catalog: Catalog, flt: str, at: str) -> None:
    r = catalog.daemon.api("GET", "/datasets/cloud/items", params={"filter": flt})
    assert r.status == 400, r.body
    assert r.body["error"]["code"] == "invalid_filter"
    assert r.body["error"]["message"].startswith(f"filter at {at}: "), r.body
    r = catalog.daemon.api("GET", "/datasets/cloud/items", params={"sort": "-colour"})
    assert r.status == 400 and "sort" in r.body["error"]["message"], r.body


def test_indexes_from_the_config_and_the_api(catalog: Catalog) -> None:
    r = catalog.daemon.api("GET", "/datasets/cloud/indexes")
    assert r.status == 200 and r.body["indexes"] == ["metadata.camera"], r.body  # from [datasets.local]
    r = catalog.daemon.api("POST", "/datasets/cloud/indexes", json_body={"field": "metadata.iso"})
    assert r.status == 201 and r.body["created"] is True, r.body
    r = catalog.daemon.api("POST", "/datasets/cloud/indexes", json_body={"field": "metadata.iso"})
    assert r.status == 200 and r.body["created"] is False, r.body
    assert r.body["indexes"] == ["metadata.camera", "metadata.iso"]
    r = catalog.daemon.api("POST", "/datasets/cloud/indexes", json_body={"field": "colour"})
    assert r.status == 400 and r.body["error"]["code"] == "invalid_filter", r.body
    # an indexed filter still answers the same
    assert page(catalog, "cloud", filter={"metadata.iso": {"$gte": 200}}, sort="metadata.iso")[0] == [
        "a/1.jpg",
        "a/2.jpg",
    ]


def test_cli_items_where_and_sort(catalog: Catalog) -> None:
    cfg = catalog.config
    where, limited, bad = parallel(
        # "--sort=-size": argparse would take a separate "-size" for an option
        lambda: cli(cfg, "items", "local", "--json", "--where", '{"metadata.camera": "gr3"}', "--sort=-size"),
        lambda: cli(cfg, "items", "cloud", "--json", "--sort", "size", "--limit", "2"),
        lambda: cli(cfg, "items", "local", "--where", '{"$or": [{"size": {"$near": 1}}]}'),
    )
    got = json_lines(where.stdout)
    assert [i["key"] for i in got] == ["b/1.jpg", "a/3.png"], describe(where)
    assert got[0]["metadata"] == {"camera": "gr3"}
    assert [i["key"] for i in json_lines(limited.stdout)] == ["b/2.txt", "a/1.jpg"], describe(limited)
    assert bad.returncode == 2, describe(bad)
    assert "filter at $or[0].size.$near: unknown operator" in bad.stderr
