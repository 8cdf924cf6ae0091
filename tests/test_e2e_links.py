"""Linked items and CSV import end to end: one real daemon (module-scoped) over a local folder
and a SeaweedFS bucket, its links' targets served over real TLS on loopback (allow-listed in
[links]), driven through HTTP and the CLI as a user would."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bucketsync.core.keys import HIDDEN
from e2e import Daemon, Response, cli, describe, json_lines, local_driver, parallel, poll, write_config, write_files
from emulators.s3 import REGION, S3Emulator
from linkserver import BODY, LinkServer

DATASETS = ("local", "cloud")
OBJECT = b"an object in another driver's bucket"


@dataclass
class Env:
    daemon: Daemon
    config: Path
    root: Path
    server: LinkServer
    emulator: S3Emulator
    bucket: str

    def storage(self) -> dict[str, Any]:
        """What is in storage now: the local folder's files and the bucket's keys (with etags).
        Not the agent's permission probes: it writes and deletes one in its hidden folder whenever
        it re-probes, so a snapshot taken meanwhile would hold a key the next one does not."""
        files = {
            str(p.relative_to(self.root / "files"))
            for p in (self.root / "files").rglob("*")
            if p.is_file() and not _probe(str(p.relative_to(self.root / "files")))
        }
        listed = self.emulator.client().list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {"local": files, "cloud": {(o["Key"], o["ETag"]) for o in listed if not _probe(o["Key"])}}


def _probe(key: str) -> bool:
    return key.startswith(f"{HIDDEN}probe-")


def link_doc(ref: str, **more: Any) -> bytes:
    return json.dumps({"type": "link", "ref": ref, **more}).encode()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, seaweedfs: S3Emulator) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("links")
    with LinkServer(root) as server:
        write_files(
            root / "files",
            {
                "a.txt": "plain",
                "refs/pic.link.json": link_doc(
                    server.url("/files/pic"), mimetype="text/plain", metadata={"by": "file"}
                ),
                "refs/bad.link.json": b'{"type": "link", "ref": 42}',
                "bin/keep.link.json": link_doc(server.url("/files/keep")),
            },
        )
        bucket = seaweedfs.new_bucket()
        s3 = seaweedfs.client()
        s3.put_object(Bucket=bucket, Key="data/b.txt", Body=b"b")
        s3.put_object(Bucket=bucket, Key="data/remote.link.json", Body=link_doc(server.url("/files/remote")))
        s3.put_object(Bucket=bucket, Key="other/obj.bin", Body=OBJECT)
        integrations = {
            "aws_test": {
                "kind": "aws",
                "access_key_id": seaweedfs.access_key_id,
                "secret_access_key": seaweedfs.secret_access_key,
            }
        }
        s3_driver = {"integration": "aws_test", "endpoint_url": seaweedfs.endpoint_url, "region": REGION}
        config = write_config(
            root,
            {
                # allow_delete everywhere: deleting a linked item must not reach storage all the same
                "files": local_driver(root / "files", allow_delete=True),
                "bucket": {"url": f"s3://{bucket}/data/", "allow_delete": True, **s3_driver},
                "other": {"url": f"s3://{bucket}/other/", **s3_driver},
            },
            {
                "local": {"driver": "files", "sync": "manual"},
                "cloud": {"driver": "bucket", "sync": "manual"},
                "other": {"driver": "other", "sync": "manual"},
            },
            integrations,
            extra={"links": {"allow": ["127.0.0.1/32"], "ca_file": str(server.cert), "timeout": "5s"}},
        )
        with Daemon(config) as daemon:
            for ds in ("local", "cloud"):
                sync(daemon, ds)
            yield Env(daemon, config, root, server, seaweedfs, bucket)


def sync(daemon: Daemon, ds: str) -> dict[str, Any]:
    run = daemon.api("POST", f"/datasets/{ds}/sync", params={"wait": "true"})
    assert run.status == 200 and run.body["status"] == "ok", run.body
    return dict(run.body)


def item_path(ds: str, key: str) -> str:
    return f"/datasets/{ds}/items/{quote(key, safe='')}"


def link(env: Env, ds: str, name: str, ref: str, **more: Any) -> Response:
    return env.daemon.api("POST", f"/datasets/{ds}/links", json_body={"name": name, "ref": ref, **more})


def post_csv(env: Env, ds: str, name: str, text: str) -> tuple[int, str]:
    req = urllib.request.Request(
        f"{env.daemon.url}/api/v1/datasets/{ds}/import?name={quote(name)}",
        data=text.encode(),
        method="POST",
        headers={"Content-Type": "text/csv"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("ds", DATASETS)
def test_a_link_by_api_is_listed_streamed_kept_by_sync_and_deleted_without_touching_storage(env: Env, ds: str) -> None:
    ref = env.server.url(f"/files/{ds}-cat")
    r = link(env, ds, "web/cat.txt", ref, mimetype="text/plain", metadata={"src": "web"})
    assert r.status == 201, r.body
    assert r.body["result"] == "created" and r.body["item"]["link"] == {"ref": ref, "from": "api"}
    assert r.body["item"]["metadata"] == {"src": "web"}
    assert link(env, ds, "web/cat.txt", ref).body["result"] == "exists"  # the same link again: nothing new
    clash = link(env, ds, "web/cat.txt", env.server.url("/files/other"))
    assert clash.status == 409 and clash.body["error"]["code"] == "already_exists", clash.body
    # Queried like any item, by the system field that says it is a link.
    found = env.daemon.api("GET", f"/datasets/{ds}/items", params={"filter": json.dumps({"link": {"$exists": True}})})
    assert "web/cat.txt" in [i["key"] for i in found.body["items"]], found.body
    # Its content is the target's, fetched over TLS from the allow-listed loopback server.
    got = env.daemon.api("GET", item_path(ds, "web/cat.txt") + "/content")
    assert got.status == 200 and got.body == BODY.decode(), got.body
    assert got.headers["Content-Type"].startswith("text/plain")
    # A listing does not find it in the bucket, and never counts it removed.
    before = env.storage()
    assert sync(env.daemon, ds)["removed"] == 0
    assert env.daemon.api("GET", item_path(ds, "web/cat.txt")).body["state"] == "live"
    # Deleting it unlinks it from the catalog; storage is as it was (allow_delete notwithstanding).
    gone = env.daemon.api("DELETE", item_path(ds, "web/cat.txt"))
    assert gone.status == 200 and gone.body["result"] == "unlinked", gone.body
    assert env.daemon.api("GET", item_path(ds, "web/cat.txt")).status == 404
    assert env.storage() == before


def test_a_cloud_ref_streams_through_the_driver_that_holds_it(env: Env) -> None:
    r = link(env, "local", "from-s3/obj.bin", f"s3://{env.bucket}/other/obj.bin")
    assert r.status == 201, r.body
    got = env.daemon.api("GET", item_path("local", "from-s3/obj.bin") + "/content")
    assert got.status == 200 and got.body == OBJECT.decode(), got.body
    r = link(env, "local", "nowhere.bin", "s3://no-such-bucket/x.bin")
    assert r.status == 400 and "no configured driver" in r.body["error"]["message"], r.body
    # A clone's pointer to a linked item streams the same target.
    cloned = env.daemon.api(
        "POST", "/datasets/local/clone", json_body={"name": "linked", "filter": {"link": {"$exists": True}}}
    )
    assert cloned.status == 201, cloned.body
    got = env.daemon.api("GET", item_path("linked", "from-s3/obj.bin") + "/content")
    assert got.status == 200 and got.body == OBJECT.decode(), got.body


def test_a_folder_delete_settles_its_links_in_the_catalog_only(env: Env) -> None:
    for n in (1, 2):
        assert link(env, "local", f"bin/{n}.txt", env.server.url(f"/files/{n}")).status == 201
    poll(lambda: env.daemon.api("GET", item_path("local", "bin/keep.link.json")).body.get("link"), what="link file")
    before = env.storage()
    r = env.daemon.api("DELETE", "/datasets/local/folders/bin", params={"force": "true"})
    assert r.status == 202 and len(r.body["ops"]) == 3, r.body  # allow_delete: queued as deletes
    for op in r.body["ops"]:
        poll(lambda op=op: env.daemon.api("GET", f"/ops/{op}").body["state"] == "done", what=f"op {op} done")
    # The outbox asked the gate again: the API links unlinked, the link file's item tombstoned, the file kept.
    assert env.daemon.api("GET", item_path("local", "bin/1.txt")).status == 404
    assert env.daemon.api("GET", item_path("local", "bin/keep.link.json")).body["state"] == "tombstone"
    assert env.storage() == before


def test_a_link_file_becomes_a_linked_item_and_its_delete_only_tombstones(env: Env) -> None:
    def recognised(ds: str, key: str) -> dict[str, Any] | None:
        body = env.daemon.api("GET", item_path(ds, key)).body
        return body if body.get("link") else None

    item = poll(lambda: recognised("local", "refs/pic.link.json"), what="the link file read")
    assert item["link"] == {"ref": env.server.url("/files/pic"), "from": "file"}
    assert item["content_type"] == "text/plain" and item["metadata"] == {"by": "file"}
    got = env.daemon.api("GET", item_path("local", "refs/pic.link.json") + "/content")
    assert got.status == 200 and got.body == BODY.decode()  # the target, not the link document
    remote = poll(lambda: recognised("cloud", "remote.link.json"), what="the bucket's link file read")
    assert remote["link"]["ref"] == env.server.url("/files/remote")
    # A file with the suffix that is no link document stays an ordinary item, and says why.
    poll(lambda: env.daemon.events("link file invalid") or None, what="the invalid link file logged")
    assert "link" not in env.daemon.api("GET", item_path("local", "refs/bad.link.json")).body
    # Deleting a link file's item tombstones it: the file stays, and a sync does not bring it back.
    gone = env.daemon.api("DELETE", item_path("local", "refs/pic.link.json"))
    assert gone.status == 200 and gone.body["result"] == "tombstoned", gone.body
    assert (env.root / "files" / "refs" / "pic.link.json").exists()
    sync(env.daemon, "local")
    assert env.daemon.api("GET", item_path("local", "refs/pic.link.json")).body["state"] == "tombstone"


def test_ssrf_refusals_are_4xx_naming_the_reason(env: Env) -> None:
    for ref, reason in (
        ("https://10.0.0.1/x", "private"),
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("https://[::1]:443/x", "loopback"),
        ("http://example.com/x", "scheme"),
    ):
        r = link(env, "local", "refused.txt", ref)
        assert r.status == 403, r.body
        assert r.body["error"]["code"] == "fetch_refused" and f"({reason})" in r.body["error"]["message"], r.body
    # A target that redirects to the metadata service is created, then refused when fetched.
    sneaky = env.server.url("/to?url=https://169.254.169.254/latest/meta-data/")
    assert link(env, "local", "sneaky.txt", sneaky).status == 201
    r = env.daemon.api("GET", item_path("local", "sneaky.txt") + "/content")
    assert r.status == 403 and "(metadata)" in r.body["error"]["message"], r.body


CSV = """url,name,action,mimetype,item_metadata,item_description
{one},one.txt,link,text/plain,"{{""n"": 1}}",the first
{two},,link,,,
{up},up.txt,upload,text/plain,"{{""n"": 3}}",
{one},bad.txt,link,,{{broken,
https://10.1.1.1/x,private.txt,link,,,
{one},what.txt,copy,,,
"""


def test_csv_import_by_the_cli_reports_each_row_and_again_creates_nothing(env: Env, tmp_path: Path) -> None:
    csv_file = tmp_path / "cats.csv"
    s = env.server
    csv_file.write_text(CSV.format(one=s.url("/files/one"), two=s.url("/files/two.txt"), up=s.url("/files/up")))
    report = tmp_path / "report.ndjson"
    proc = cli(env.config, "import", "local", str(csv_file), "--report", str(report))
    assert proc.returncode == 1, describe(proc)  # a row failed
    assert "6 rows into cats/: 3 created, 0 existed, 3 failed" in proc.stdout, describe(proc)
    lines = json_lines(report.read_text())
    rows = {line["row"]: line for line in lines[:-1]}
    assert lines[-1]["report"] == {"folder": "cats/", "rows": 6, "created": 3, "exists": 0, "failed": 3}
    assert [rows[n]["result"] for n in range(1, 7)] == ["created"] * 3 + ["failed"] * 3
    assert rows[2]["key"] == "cats/two.txt"  # named after the URL
    assert "item_metadata is not JSON" in rows[4]["reason"]
    assert "(private)" in rows[5]["reason"]
    assert "action 'copy'" in rows[6]["reason"]
    for n in (4, 5, 6):
        assert f"row {n}: failed" in proc.stderr
    one = env.daemon.api("GET", item_path("local", "cats/one.txt")).body
    assert one["link"]["from"] == "api" and one["metadata"] == {"n": 1, "description": "the first"}
    assert env.daemon.api("GET", item_path("local", "cats/one.txt") + "/content").body == BODY.decode()
    # The upload row fetched its URL into the bucket, through the outbox.
    assert (env.root / "files" / "cats" / "up.txt").read_bytes() == BODY
    up = env.daemon.api("GET", item_path("local", "cats/up.txt")).body
    assert "link" not in up and up["metadata"] == {"n": 3} and up["content_type"] == "text/plain"

    # Again (through the API this time: the same import, without a second CLI start-up).
    status, text = post_csv(env, "local", "cats.csv", csv_file.read_text())
    assert status == 200, text
    assert json_lines(text)[-1]["report"] == {
        "folder": "cats/",
        "rows": 6,
        "created": 0,
        "exists": 3,
        "failed": 3,
    }
    folder = env.daemon.api("GET", "/datasets/local/folders", params={"parent": "cats"}).body
    assert folder["items"] == 3, folder


def test_import_through_the_api_streams_ndjson_and_refuses_a_bad_csv_whole(env: Env) -> None:
    status, text = post_csv(env, "cloud", "dogs.csv", f"url\n{env.server.url('/files/rex.jpg')}\n")
    assert status == 200, text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0] == {"row": 1, "key": "dogs/rex.jpg", "action": "link", "result": "created", "reason": None}
    assert lines[-1]["report"]["created"] == 1
    status, text = post_csv(env, "cloud", "dogs.csv", "link,size\nx,1\n")
    assert status == 400 and json.loads(text)["error"]["code"] == "invalid_csv" and "'link'" in text, text
    status, text = post_csv(env, "cloud", "", "url\n")
    assert status == 400 and "'name'" in text, text


def test_an_object_that_appears_at_a_links_key_wins(env: Env) -> None:
    assert link(env, "local", "won.txt", env.server.url("/files/won")).status == 201
    write_files(env.root / "files", {"won.txt": "the bucket's own"})
    run = sync(env.daemon, "local")
    assert run["added"] == 1 and run["removed"] == 0, run
    item = env.daemon.api("GET", item_path("local", "won.txt")).body
    assert "link" not in item and item["size"] == len("the bucket's own"), item
    assert env.daemon.api("GET", item_path("local", "won.txt") + "/content").body == "the bucket's own"
    assert sync(env.daemon, "local")["added"] == 0  # indexed once, not again every run


def test_the_cli_import_says_what_is_wrong(env: Env, tmp_path: Path) -> None:
    alone = write_config(tmp_path, {"d": local_driver(tmp_path / "d")}, {"ds": {"driver": "d", "sync": "manual"}})
    (tmp_path / "cats.csv").write_text("url\nhttps://example.com/a.jpg\n")
    (tmp_path / "bad.csv").write_text("url,colour\nhttps://example.com/a.jpg,red\n")
    no_agent, no_file, bad_header = parallel(
        lambda: cli(alone, "import", "ds", str(tmp_path / "cats.csv")),
        lambda: cli(env.config, "import", "local", str(tmp_path / "nope.csv")),
        lambda: cli(env.config, "import", "local", str(tmp_path / "bad.csv")),
    )
    assert no_agent.returncode == 1 and "running agent" in no_agent.stderr, describe(no_agent)
    assert no_file.returncode == 2 and "nope.csv: no such file" in no_file.stderr, describe(no_file)
    assert bad_header.returncode == 2 and "'colour'" in bad_header.stderr, describe(bad_header)
    assert "invalid_csv" in bad_header.stderr
