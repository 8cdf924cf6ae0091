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

from e2e import Daemon, cli, describe, json_lines, local_driver, parallel, poll, write_config, write_files
from emulators.s3 import PREFIX, REGION, S3Emulator

FILES = {"a/1.jpg": b"1" * 10, "a/2.jpg": b"2" * 20, "a/3.png": b"3" * 30, "b/1.jpg": b"4" * 40, "b/2.txt": b"5"}
META = {
    "a/1.jpg": {"camera": "x100", "iso": 200},
    "a/2.jpg": {"camera": "x100", "iso": 400},
    "a/3.png": {"camera": "gr3", "iso": 100},
    "b/1.jpg": {"camera": "gr3"},
}
DATASETS = ("local", "cloud")
#: what the folder deletes remove: "trash" (a local folder, allow_delete) and "bin" (SeaweedFS, no allow_delete)
TRASH = {"keep/1": "k", "keep/2": "k", "keep/3": "k", "gone/x/1": "g", "gone/2": "g"}


@dataclass
class Catalog:
    daemon: Daemon
    config: Path
    root: Path
    emulator: S3Emulator
    bucket: str


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, seaweedfs: S3Emulator) -> Iterator[Catalog]:
    root = tmp_path_factory.mktemp("catalog")
    write_files(root / "files", FILES)
    write_files(root / "trash", TRASH)
    write_files(root / "src", {"p/1.txt": "one", "p/2.txt": "two", "p/3.txt": "three"})
    bucket = seaweedfs.new_bucket()
    for key, body in FILES.items():
        seaweedfs.client().put_object(Bucket=bucket, Key=PREFIX + key, Body=body)
    for key, text in TRASH.items():
        seaweedfs.client().put_object(Bucket=bucket, Key=f"bin/{key}", Body=text.encode())
    for key in ("in/a.txt", "in/b.txt", "in/c.txt"):
        seaweedfs.client().put_object(Bucket=bucket, Key=f"mv/{key}", Body=key.encode())
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
        {
            "files": local_driver(root / "files"),
            "bucket": {**s3, "region": REGION},
            "trash": local_driver(root / "trash", allow_delete=True),
            "src": local_driver(root / "src", allow_delete=True),
            "bin": {**s3, "url": f"s3://{bucket}/bin/", "region": REGION},
            "mv": {**s3, "url": f"s3://{bucket}/mv/", "region": REGION, "allow_delete": True},
        },
        {
            "local": {"driver": "files", "sync": "manual", "indexes": ["metadata.camera"]},
            "cloud": {"driver": "bucket", "sync": "manual"},
            "trash": {"driver": "trash", "sync": "manual"},
            "bin": {"driver": "bin", "sync": "manual"},
            "mv": {"driver": "mv", "sync": "manual"},
            "src": {"driver": "src", "sync": "manual"},
        },
        integrations,
    )
    with Daemon(config) as daemon:
        for ds in (*DATASETS, "trash", "bin", "mv", "src"):
            run = daemon.api("POST", f"/datasets/{ds}/sync", params={"wait": "true"})
            assert run.status == 200 and run.body["status"] == "ok", run.body
            for key, meta in META.items() if ds in DATASETS else ():
                r = daemon.api("PATCH", f"/datasets/{ds}/items/{quote(key, safe='')}", json_body={"metadata": meta})
                assert r.status == 200, r.body
        yield Catalog(daemon, config, root, seaweedfs, bucket)


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
    r = catalog.daemon.api("GET", "/datasets/local/indexes")
    assert r.status == 200 and r.body["indexes"] == ["metadata.camera"], r.body  # from [datasets.local]
    assert catalog.daemon.api("GET", "/datasets/cloud/indexes").body["indexes"] == []
    r = catalog.daemon.api("POST", "/datasets/cloud/indexes", json_body={"field": "metadata.iso"})
    assert r.status == 201 and r.body["created"] is True, r.body
    r = catalog.daemon.api("POST", "/datasets/cloud/indexes", json_body={"field": "metadata.iso"})
    assert r.status == 200 and r.body["created"] is False, r.body
    assert r.body["indexes"] == ["metadata.iso"]
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
    # missing last, then by name
    assert names(sort="-metadata.rank") == ["local", "cloud", "trash", "src", "mv", "bin"]
    assert names(filter='{"name": {"$prefix": "clo"}}') == ["cloud"]
    listed = d.api("GET", "/datasets").body["datasets"]
    assert {s["dataset"]: s["metadata"] for s in listed} == {
        "local": {"team": "vision", "rank": 2},
        "cloud": {"team": "ops", "rank": 1},
        "trash": {},
        "bin": {},
        "mv": {},
        "src": {},
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


@pytest.mark.parametrize("ds", DATASETS)
def test_folders_from_the_ledger(catalog: Catalog, ds: str) -> None:
    d = catalog.daemon
    top = d.api("GET", f"/datasets/{ds}/folders")
    assert top.status == 200, top.body
    assert top.body == {
        "parent": "",
        "folders": [
            {"name": "a", "path": "a/", "items": 3, "size": 60},
            {"name": "b", "path": "b/", "items": 2, "size": 41},
        ],
        "items": 0,
        "size": 0,
    }
    inside = d.api("GET", f"/datasets/{ds}/folders", params={"parent": "a"}).body
    assert inside == {"parent": "a/", "folders": [], "items": 3, "size": 60}
    bad = d.api("GET", f"/datasets/{ds}/folders", params={"parent": "../etc"})
    assert bad.status == 400 and bad.body["error"]["code"] == "invalid_key", bad.body
    # an empty folder cannot exist in a bucket: refused in a synced dataset, saying why
    made = d.api("POST", f"/datasets/{ds}/folders", json_body={"path": "c/d"})
    assert made.status == 403 and made.body["error"]["code"] == "empty_folders_unsupported", made.body
    assert "object storage has no folders" in made.body["error"]["message"]


def test_ls_lists_folders_then_items(catalog: Catalog) -> None:
    top, inside, long = parallel(
        lambda: cli(catalog.config, "ls", "local"),
        lambda: cli(catalog.config, "ls", "cloud/a/", "--json"),
        lambda: cli(catalog.config, "ls", "local/a", "-l"),
    )
    assert top.stdout.splitlines() == ["a/", "b/"], describe(top)
    assert [(o["type"], o["key"]) for o in json_lines(inside.stdout)] == [
        ("item", "a/1.jpg"),
        ("item", "a/2.jpg"),
        ("item", "a/3.png"),
    ], describe(inside)
    assert [line.split()[0] for line in long.stdout.splitlines()] == ["10", "20", "30"], describe(long)


def _wait_done(d: Daemon, ops: list[int]) -> None:
    def settled() -> bool | None:
        return all(d.api("GET", f"/ops/{op}").body["state"] == "done" for op in ops) or None

    poll(settled, what="the folder's delete ops to finish")


def test_delete_folder_with_allow_delete_queues_ops_under_the_guard(catalog: Catalog) -> None:
    d = catalog.daemon
    gone = d.api("DELETE", "/datasets/trash/folders/gone", params={"force": "false"})
    assert gone.status == 202 and gone.body["result"] == "deleted" and gone.body["items"] == 2, gone.body
    _wait_done(d, gone.body["ops"])
    assert not (catalog.root / "trash" / "gone" / "2").exists()
    assert not (catalog.root / "trash" / "gone" / "x" / "1").exists()
    assert page(catalog, "trash")[0] == ["keep/1", "keep/2", "keep/3"]
    # every remaining item at once: past max_delete_ratio, refused whole unless forced
    keep = d.api("DELETE", "/datasets/trash/folders/keep%2F")
    assert keep.status == 403 and keep.body["error"]["code"] == "max_delete_ratio", keep.body
    assert (catalog.root / "trash" / "keep" / "1").exists()
    forced = d.api("DELETE", "/datasets/trash/folders/keep", params={"force": "true"})
    assert forced.status == 202 and forced.body["items"] == 3, forced.body
    _wait_done(d, forced.body["ops"])
    assert not (catalog.root / "trash" / "keep").exists() or not any((catalog.root / "trash" / "keep").iterdir())
    again = d.api("DELETE", "/datasets/trash/folders/keep", params={"force": "true"})
    assert again.status == 404, again.body


def test_delete_folder_without_allow_delete_tombstones_and_storage_keeps_the_objects(catalog: Catalog) -> None:
    d = catalog.daemon
    r = d.api("DELETE", "/datasets/bin/folders/gone")
    assert r.status == 200 and r.body == {"folder": "gone/", "result": "tombstoned", "items": 2, "ops": []}, r.body
    assert page(catalog, "bin", state="tombstone")[0] == ["gone/2", "gone/x/1"]
    for key in ("gone/2", "gone/x/1"):
        catalog.emulator.client().head_object(Bucket=catalog.bucket, Key=f"bin/{key}")  # still there
    assert d.api("GET", "/datasets/bin/folders").body["folders"] == [
        {"name": "keep", "path": "keep/", "items": 3, "size": 3}
    ]


def _exists(c: Catalog, key: str) -> bool:
    try:
        c.emulator.client().head_object(Bucket=c.bucket, Key=key)
    except Exception as exc:  # botocore's ClientError for the 404
        assert "404" in str(exc) or "Not Found" in str(exc), exc
        return False
    return True


def test_move_in_a_synced_dataset_copies_then_deletes_and_keeps_the_item(catalog: Catalog) -> None:
    d = catalog.daemon
    before = d.api("PATCH", "/datasets/mv/items/in%2Fa.txt", json_body={"metadata": {"tag": "keep me"}}).body["item"]
    r = d.api("POST", "/datasets/mv/move", json_body={"to": "out", "keys": ["in/a.txt"]})
    assert r.status == 200, r.body
    (moved,) = r.body["results"]
    assert moved["result"] == "moved" and moved["to"] == "out/a.txt", moved
    _wait_done(d, [moved["op"]])
    after = d.api("GET", "/datasets/mv/items/out%2Fa.txt").body
    assert after["id"] == before["id"] and after["metadata"] == {"tag": "keep me"}, after
    assert d.api("GET", "/datasets/mv/items/in%2Fa.txt").status == 404
    assert _exists(catalog, "mv/out/a.txt") and not _exists(catalog, "mv/in/a.txt")
    content = d.request("GET", "/api/v1/datasets/mv/items/out%2Fa.txt/content")
    assert content.body == "in/a.txt"
    # by filter
    r = d.api("POST", "/datasets/mv/move", json_body={"to": "out", "filter": {"key": {"$prefix": "in/b"}}})
    assert [(m["key"], m["result"]) for m in r.body["results"]] == [("in/b.txt", "moved")], r.body
    _wait_done(d, [r.body["results"][0]["op"]])
    assert page(catalog, "mv")[0] == ["in/c.txt", "out/a.txt", "out/b.txt"]


def test_move_without_allow_delete_is_refused_before_anything_is_copied(catalog: Catalog) -> None:
    d = catalog.daemon
    r = d.api("POST", "/datasets/cloud/move", json_body={"to": "z", "keys": ["a/1.jpg"]})
    assert r.status == 403 and r.body["error"]["code"] == "move_needs_allow_delete", r.body
    assert "allow_delete = false" in r.body["error"]["message"]
    assert not _exists(catalog, PREFIX + "z/1.jpg") and _exists(catalog, PREFIX + "a/1.jpg")
    bad = d.api("POST", "/datasets/mv/move", json_body={"to": "z", "filter": None})
    assert bad.status == 400, bad.body


def test_clone_pointers_metadata_unlink_and_orphans(catalog: Catalog) -> None:
    d = catalog.daemon
    assert d.api("PATCH", "/datasets/src/items/p%2F1.txt", json_body={"metadata": {"tag": "a"}}).status == 200
    r = d.api("POST", "/datasets/src/clone", json_body={"name": "snap", "with_metadata": True})
    assert r.status == 201 and r.body == {"dataset": "snap", "kind": "clone", "source": "src", "items": 3}, r.body
    r = d.api("POST", "/datasets/src/clone", json_body={"name": "snap2", "filter": {"key": {"$prefix": "p/2"}}})
    assert r.status == 201 and r.body["items"] == 1, r.body
    assert d.api("POST", "/datasets/src/clone", json_body={"name": "snap"}).status == 409
    assert d.api("POST", "/datasets/src/clone", json_body={"name": "Bad Name"}).status == 400
    assert d.api("POST", "/datasets/snap/clone", json_body={"name": "x"}).status == 404  # only synced sources
    listed = {s["dataset"]: s for s in d.api("GET", "/datasets").body["datasets"]}
    assert (listed["snap"]["kind"], listed["snap"]["source"], listed["snap"]["driver"]) == ("clone", "src", None)
    assert listed["src"]["kind"] == "synced"

    def item(ds: str, key: str) -> dict[str, Any]:
        r = d.api("GET", f"/datasets/{ds}/items/{quote(key, safe='')}")
        assert r.status == 200, r.body
        return dict(r.body)

    # metadata: copied when asked, then the clone's own (copy on write)
    assert item("snap", "p/1.txt")["metadata"] == {"tag": "a"}
    assert item("snap2", "p/2.txt")["metadata"] == {}
    assert d.api("PATCH", "/datasets/snap/items/p%2F1.txt", json_body={"metadata": {"tag": "b"}}).status == 200
    assert item("snap", "p/1.txt")["metadata"] == {"tag": "b"} and item("src", "p/1.txt")["metadata"] == {"tag": "a"}
    # content comes from the source's binary; nothing was copied
    assert d.request("GET", "/api/v1/datasets/snap/items/p%2F1.txt/content").body == "one"
    # a delete in a clone unlinks the pointer; storage is never touched, though the driver allows deletes
    backlog = d.api("GET", "/ops").body["ops"]
    r = d.api("DELETE", "/datasets/snap/items/p%2F3.txt")
    assert r.status == 200 and r.body["result"] == "unlinked", r.body
    assert (catalog.root / "src" / "p" / "3.txt").read_text() == "three"
    assert d.api("GET", "/ops").body["ops"] == backlog
    assert item("src", "p/3.txt")["state"] == "live"
    # the source's sync removes one object and changes another: pointers say so
    (catalog.root / "src" / "p" / "2.txt").unlink()
    (catalog.root / "src" / "p" / "1.txt").write_text("one, changed")
    run = d.api("POST", "/datasets/src/sync", params={"wait": "true"})
    assert run.body["removed"] == 1 and run.body["modified"] == 1, run.body
    states = {i["key"]: i["state"] for i in d.api("GET", "/datasets/snap/items", params={"state": "all"}).body["items"]}
    assert states == {"p/1.txt": "stale", "p/2.txt": "orphaned"}
    assert page(catalog, "snap2", state="all", filter={"state": "orphaned"})[0] == ["p/2.txt"]
    counted = {s["dataset"]: s["items"] for s in d.api("GET", "/datasets").body["datasets"]}
    assert counted["snap"] == {"live": 0, "tombstone": 0, "orphaned": 1, "stale": 1}, counted
    assert counted["snap2"]["orphaned"] == 1
    # deleting a runtime dataset deletes its catalog only
    r = d.api("DELETE", "/datasets/snap")
    assert r.status == 200 and r.body == {"dataset": "snap", "deleted": True, "items": 2}, r.body
    assert d.api("GET", "/datasets/snap/items").status == 404
    assert (catalog.root / "src" / "p" / "1.txt").exists() and item("src", "p/1.txt")["state"] == "live"
    assert d.api("DELETE", "/datasets/src").status == 403
    assert d.api("POST", "/datasets/src/clone", json_body={"name": "snap"}).status == 201  # the name is free again


def test_merge_keeps_both_or_merges_as_asked(catalog: Catalog) -> None:
    d = catalog.daemon
    assert d.api("PATCH", "/datasets/cloud/items/a%2F1.jpg", json_body={"metadata": {"only_cloud": 1}}).status == 200

    def merge(name: str, on_conflict: str) -> dict[str, Any]:
        body = {"name": name, "sources": ["local", "cloud"], "on_conflict": on_conflict}
        r = d.api("POST", "/datasets/merge", json_body=body)
        assert r.status == 201, r.body
        return dict(r.body)

    assert merge("m-folder", "folder")["items"] == 10
    assert page(catalog, "m-folder", limit=3)[0] == ["cloud/a/1.jpg", "cloud/a/2.jpg", "cloud/a/3.png"]
    assert merge("m-suffix", "suffix")["items"] == 10
    keys = page(catalog, "m-suffix", filter={"key": {"$prefix": "a/"}})[0]
    assert keys == ["a/1.jpg", "a/1~cloud.jpg", "a/2.jpg", "a/2~cloud.jpg", "a/3.png", "a/3~cloud.png"]
    assert merge("m-merge", "merge") == {"dataset": "m-merge", "kind": "merge", "source": "local,cloud", "items": 5}
    one = d.api("GET", "/datasets/m-merge/items/a%2F1.jpg").body
    assert one["metadata"] == {"camera": "x100", "iso": 200, "only_cloud": 1}, one
    # the merged item is the first source's binary (a local file), read where it is
    assert d.request("GET", "/api/v1/datasets/m-merge/items/a%2F1.jpg/content").text == "1" * 10
    assert d.api("DELETE", "/datasets/m-merge/items/a%2F1.jpg").body["result"] == "unlinked"
    assert (catalog.root / "files" / "a" / "1.jpg").exists()
    bad = d.api("POST", "/datasets/merge", json_body={"name": "m-x", "sources": ["local"], "on_conflict": "merge"})
    assert bad.status == 400, bad.body
    again = d.api(
        "POST", "/datasets/merge", json_body={"name": "m-merge", "sources": ["local", "cloud"], "on_conflict": "merge"}
    )
    assert again.status == 409, again.body
    kinds = {s["dataset"]: s["kind"] for s in d.api("GET", "/datasets").body["datasets"]}
    assert kinds["m-suffix"] == "merge" and kinds["local"] == "synced"


def test_cli_clone_and_merge_through_the_agent(catalog: Catalog) -> None:
    cfg = catalog.config
    cloned, merged, bad = parallel(
        lambda: cli(cfg, "clone", "local", "cli-snap", "--with-metadata", "--where", '{"key": "a/2.jpg"}', "--json"),
        lambda: cli(cfg, "merge", "cli-merge", "local", "cloud", "--on-conflict", "suffix"),
        lambda: cli(cfg, "clone", "local", "Bad Name"),
    )
    assert json_lines(cloned.stdout) == [{"dataset": "cli-snap", "kind": "clone", "source": "local", "items": 1}], (
        describe(cloned)
    )
    assert merged.stdout.strip() == "cli-merge: merge of local,cloud, 10 items", describe(merged)
    assert bad.returncode == 2 and "name must match" in bad.stderr, describe(bad)
    item = catalog.daemon.api("GET", "/datasets/cli-snap/items/a%2F2.jpg").body
    assert item["metadata"] == {"camera": "x100", "iso": 400}, item


def test_folders_of_a_clone_are_catalog_only(catalog: Catalog) -> None:
    d = catalog.daemon
    assert d.api("POST", "/datasets/local/clone", json_body={"name": "fold"}).status == 201
    made = d.api("POST", "/datasets/fold/folders", json_body={"path": "new/empty"})
    assert made.status == 201 and made.body == {"folder": "new/empty/", "created": True}, made.body
    assert d.api("POST", "/datasets/fold/folders", json_body={"path": "new/empty"}).body["created"] is False
    assert d.api("POST", "/datasets/fold/folders", json_body={"path": "new/"}).status == 400  # the key rules
    top = d.api("GET", "/datasets/fold/folders").body["folders"]
    assert [(f["name"], f["items"]) for f in top] == [("a", 3), ("b", 2), ("new", 0)], top
    # a move is a key change in the catalog; the file stays where it is
    moved = d.api("POST", "/datasets/fold/move", json_body={"to": "new/empty", "keys": ["a/1.jpg", "a/2.jpg"]})
    assert [m["result"] for m in moved.body["results"]] == ["moved", "moved"], moved.body
    assert page(catalog, "fold", filter={"key": {"$prefix": "new/"}})[0] == ["new/empty/1.jpg", "new/empty/2.jpg"]
    assert (catalog.root / "files" / "a" / "1.jpg").exists() and not (catalog.root / "files" / "new").exists()
    assert d.request("GET", "/api/v1/datasets/fold/items/new%2Fempty%2F1.jpg/content").text == "1" * 10
    # a folder delete unlinks, under the guard: 2 of 5 pass, then 2 of the 3 left do not
    gone = d.api("DELETE", "/datasets/fold/folders/b")
    assert gone.status == 200 and gone.body == {"folder": "b/", "result": "unlinked", "items": 2, "ops": []}
    guarded = d.api("DELETE", "/datasets/fold/folders/new")
    assert guarded.status == 403 and guarded.body["error"]["code"] == "max_delete_ratio", guarded.body
    forced = d.api("DELETE", "/datasets/fold/folders/new", params={"force": "true"})
    assert forced.status == 200 and forced.body["items"] == 2, forced.body
    assert [f["name"] for f in d.api("GET", "/datasets/fold/folders").body["folders"]] == ["a"]
    assert sorted(p.name for p in (catalog.root / "files" / "a").iterdir()) == ["1.jpg", "2.jpg", "3.png"]
    assert sorted(p.name for p in (catalog.root / "files" / "b").iterdir()) == ["1.jpg", "2.txt"]
