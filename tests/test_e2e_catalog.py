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


def test_dataset_metadata_filters_and_sorts_datasets(catalog: Catalog) -> None:
    d = catalog.daemon
    r = d.api("PATCH", "/datasets/local", json_body={"metadata": {"team": "vision", "rank": 2, "tmp": "x"}})
    assert r.status == 200 and r.body == {"dataset": "local", "metadata": {"team": "vision", "rank": 2, "tmp": "x"}}
    r = d.api("PATCH", "/datasets/local", json_body={"metadata": {"tmp": None}})  # merged; null removes
    assert r.body["metadata"] == {"team": "vision", "rank": 2}, r.body
    assert d.api("PATCH", "/datasets/cloud", json_body={"metadata": {"team": "ops", "rank": 1}}).status == 200
    bad = d.api("PATCH", "/datasets/cloud", json_body={"metadata": {"bad name": 1}})
    assert bad.status == 400 and bad.body["error"]["code"] == "invalid_metadata", bad.body
    assert d.api("PATCH", "/datasets/nope", json_body={"metadata": {"a": 1}}).status == 404

    def names(**params: str) -> list[str]:
        r = d.api("GET", "/datasets", params=params)
        assert r.status == 200, r.body
        return [s["dataset"] for s in r.body["datasets"]]

    assert names(filter='{"metadata.team": "vision"}') == ["local"]
    assert names(filter='{"metadata.rank": {"$lte": 2}}', sort="metadata.rank") == ["cloud", "local"]
    assert names(sort="-metadata.rank") == ["local", "cloud"]
    assert names(filter='{"name": {"$prefix": "clo"}}') == ["cloud"]
    listed = d.api("GET", "/datasets").body["datasets"]
    assert {s["dataset"]: s["metadata"] for s in listed} == {
        "local": {"team": "vision", "rank": 2},
        "cloud": {"team": "ops", "rank": 1},
    }
    r = d.api("GET", "/datasets", params={"filter": '{"metadata.rank": {"$gt": true}}'})
    assert r.status == 400 and "metadata.rank.$gt" in r.body["error"]["message"], r.body

    table, where = parallel(
        lambda: cli(catalog.config, "datasets", "--columns", "team,metadata.rank", "--sort=-metadata.rank"),
        lambda: cli(catalog.config, "datasets", "--json", "--where", '{"metadata.team": "ops"}'),
    )
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and lines[0].split() == ["DATASET", "ITEMS", "LAST", "RUN", "team", "metadata.rank"]
    assert lines[1].split()[0] == "local" and lines[1].split()[-2:] == ["vision", "2"], describe(table)
    assert lines[2].split()[0] == "cloud" and lines[2].split()[-2:] == ["ops", "1"], describe(table)
    assert [s["dataset"] for s in json_lines(where.stdout)[0]["datasets"]] == ["cloud"], describe(where)
