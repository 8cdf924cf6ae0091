"""Events mode end to end: a real daemon, real storage, changes that only events can explain.

Datasets here have a one-hour ``reconcile_interval`` (and, but for the one whose source is
made to fail, ``interval``): after the start-up listing, a change that reaches the catalog
came through an event (the runs say so: kind ``events``), unless the test asks for a
reconcile itself.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e import Daemon, local_driver, poll, query_ledger, write_config, write_files
from emulators.gcs import FakeGcs
from emulators.s3 import PREFIX, S3Emulator

pytestmark = pytest.mark.slow

QUIET = {"interval": "1h", "reconcile_interval": "1h"}  # no listing run after start-up unless asked
SECRET = "hook-secret-123"
TOKEN = "api-token-xyz"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AGENT = {"api_token": TOKEN}


# ---------------------------------------------------------------------- helpers


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(daemon.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def catalog(daemon: Daemon, dataset: str, state: str = "live") -> dict[str, dict[str, Any]]:
    r = daemon.api("GET", f"/datasets/{dataset}/items", params={"limit": "1000", "state": state}, headers=AUTH)
    assert r.status == 200, r.text
    return {i["key"]: i for i in r.body["items"]}


def runs(daemon: Daemon, dataset: str) -> list[dict[str, Any]]:
    r = daemon.api("GET", f"/datasets/{dataset}/runs", params={"limit": "1000"}, headers=AUTH)
    assert r.status == 200, r.text
    return list(r.body["runs"])


def listing_runs(daemon: Daemon, dataset: str) -> list[dict[str, Any]]:
    return [r for r in runs(daemon, dataset) if r["kind"] == "listing"]


def wait_keys(daemon: Daemon, dataset: str, want: set[str], what: str) -> dict[str, dict[str, Any]]:
    return poll(lambda: c if set(c := catalog(daemon, dataset)) == want else None, what=what)


def started(daemon: Daemon, dataset: str) -> None:
    """The start-up listing ran and the event source delivers."""
    daemon.wait_ready()
    poll(lambda: [r for r in listing_runs(daemon, dataset) if r["status"] != "running"] or None, what="start-up run")
    poll(lambda: metric(daemon, "bucketsync_event_source_up", dataset=dataset) == 1 or None, what="source up")


# ---------------------------------------------------------------------- watch (local folder)


def test_watch_applies_creates_overwrites_deletes_and_renames_without_a_poll(tmp_path: Path) -> None:
    data, burst = tmp_path / "data", tmp_path / "burst"
    write_files(data, {"keep.txt": "k", "old.txt": "to be renamed", "skip.tmp": "x"})
    write_files(burst, {f"f{i}.txt": str(i) for i in range(10)})
    cfg = write_config(
        tmp_path,
        {"d": local_driver(data), "b": local_driver(burst)},
        {
            "photos": {"driver": "d", "sync": "events", "exclude": ["*.tmp"], **QUIET},
            "guarded": {"driver": "b", "sync": "events", "max_delete_ratio": 0.5, **QUIET},
        },
        agent=AGENT,
    )
    with Daemon(cfg) as daemon:
        started(daemon, "photos")
        started(daemon, "guarded")
        before = wait_keys(daemon, "photos", {"keep.txt", "old.txt"}, "start-up listing")
        # create, in a new sub-folder too, and bucketsync's own hidden folder and a filtered key
        write_files(data, {"new.txt": "new", "sub/deep.txt": "deep", ".bucketsync/x": "h", "more.tmp": "y"})
        wait_keys(daemon, "photos", {"keep.txt", "old.txt", "new.txt", "sub/deep.txt"}, "creates")
        # overwrite
        (data / "keep.txt").write_text("kept, longer now")
        poll(lambda: catalog(daemon, "photos")["keep.txt"]["size"] == 16 or None, what="overwrite")
        # rename: the item keeps its id
        os.rename(data / "old.txt", data / "renamed.txt")
        after = wait_keys(daemon, "photos", {"keep.txt", "renamed.txt", "new.txt", "sub/deep.txt"}, "rename")
        assert after["renamed.txt"]["id"] == before["old.txt"]["id"]
        # delete a file and a whole folder
        (data / "new.txt").unlink()
        shutil.rmtree(data / "sub")
        wait_keys(daemon, "photos", {"keep.txt", "renamed.txt"}, "deletes")

        # A burst of deletes past the guard is held; the reconcile it asks for decides (and refuses).
        for i in range(8):
            (burst / f"f{i}.txt").unlink()
        poll(lambda: [r for r in listing_runs(daemon, "guarded") if r["status"] == "aborted"] or None,
             what="a reconcile stopped by the guard")  # fmt: skip
        assert len(catalog(daemon, "guarded")) == 10  # nothing removed
        assert metric(daemon, "bucketsync_events_dropped_total", dataset="guarded", reason="guard") == 8
        assert daemon.get("/readyz").body["detail"]["guarded"]["guard_blocked"] is True

        assert len(listing_runs(daemon, "photos")) == 1  # only the start-up listing: events did the rest
        kinds = {r["kind"] for r in runs(daemon, "photos")}
        assert kinds == {"listing", "events"}
        totals = {k: sum(r[k] for r in runs(daemon, "photos") if r["kind"] == "events") for k in ("added", "renamed")}
        assert totals["renamed"] == 1
        assert metric(daemon, "bucketsync_events_dropped_total", dataset="photos", reason="filtered") >= 1
        assert metric(daemon, "bucketsync_event_latency_seconds_count", dataset="photos") >= 5
        detail = daemon.get("/readyz").body["detail"]["photos"]["events"]
        assert detail == {"source": "watch", "state": "up", "reason": None}
        assert daemon.stop() == 0


# ---------------------------------------------------------------------- webhook: S3 records (SeaweedFS)


def s3_record(event: str, bucket: str, key: str, seq: int, size: int = 0, etag: str = "") -> dict[str, Any]:
    """One record as MinIO posts it: the key URL-encoded with '+' for a space."""
    from urllib.parse import quote_plus

    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventTime": "2026-01-01T00:00:00.000Z",
        "eventName": event,
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": quote_plus(PREFIX + key, safe="/"), "size": size, "eTag": etag,
                       "sequencer": f"{seq:016X}"},
        },
    }  # fmt: skip


def post_s3(daemon: Daemon, dataset: str, *records: dict[str, Any], secret: str | None = SECRET) -> Any:
    headers = {"X-Bucketsync-Secret": secret} if secret is not None else {}
    return daemon.api("POST", f"/events/s3/{dataset}", json_body={"Records": list(records)}, headers=headers)


def test_webhooks_s3_records_and_gcs_push_inbox_survives_kill_9_and_events_converge(
    tmp_path: Path, seaweedfs: S3Emulator, fake_gcs: FakeGcs
) -> None:
    bucket = seaweedfs.new_bucket()
    gbucket = fake_gcs.create_bucket()
    for name in ("base1.txt", "base2.txt"):  # so that removing one item later is within the guard's limits
        upload(fake_gcs, gbucket, name, b"base")
    s3 = seaweedfs.client()
    s3.put_object(Bucket=bucket, Key=PREFIX + "first.txt", Body=b"1")
    driver = {
        "url": f"s3://{bucket}/{PREFIX}",
        "integration": "aws",
        "endpoint_url": seaweedfs.endpoint_url,
        "region": "us-east-1",
        "events": {"source": "webhook", "secret": SECRET},
    }
    integ = {"aws": {"kind": "aws", "access_key_id": seaweedfs.access_key_id,
                     "secret_access_key": seaweedfs.secret_access_key}}  # fmt: skip
    gdriver = {"url": f"gs://{gbucket}/{PREFIX}", "endpoint_url": fake_gcs.url, "events": {"source": "webhook"}}
    cat = {"driver": "g", "sync": "events", "interval": "0.5s", "reconcile_interval": "1h"}  # polls while degraded
    cfg = write_config(
        tmp_path,
        {"s3": driver, "g": gdriver},
        {"raw": {"driver": "s3", "sync": "events", **QUIET}, "cat": cat},
        integ,
        agent=AGENT,
    )
    ledger = tmp_path / "var" / "ledger.db"

    # kill -9 between accepting and applying: the inbox keeps every accepted event.
    s3.put_object(Bucket=bucket, Key=PREFIX + "a b.txt", Body=b"hello")
    with Daemon(cfg, env={"BUCKETSYNC_FAILPOINT": "events.before_apply"}) as crashing:
        crashing.wait_ready()
        r = post_s3(crashing, "raw", s3_record("s3:ObjectCreated:Put", bucket, "a b.txt", 1, 5))
        assert r.status == 202 and r.body == {"accepted": 1, "ignored": 0}, r.text
        assert crashing.wait() == 137
    assert query_ledger(ledger, "SELECT key, kind FROM event_inbox") == [("a b.txt", "changed")]

    # This time the GCS dataset's source fails as it first delivers: it falls back to polling, comes back.
    with Daemon(cfg, env={"BUCKETSYNC_RAISEPOINT": "events.source.cat:1"}) as daemon:
        daemon.wait_ready()
        degraded = poll(
            lambda: d if (d := daemon.get("/readyz").body["detail"]["cat"]["events"])["state"] == "degraded" else None,
            interval=0.05,
            what="degraded",
        )
        assert degraded["source"] == "webhook" and "events.source.cat" in degraded["reason"]
        assert daemon.get("/readyz").status == 200  # degraded is not down: it polls
        started(daemon, "raw")
        wait_keys(daemon, "raw", {"first.txt", "a b.txt"}, "start-up")
        listings = len(listing_runs(daemon, "raw"))  # the crashed daemon's start-up listing, and this one's
        poll(lambda: query_ledger(ledger, "SELECT count(*) FROM event_inbox") == [(0,)] or None, what="inbox drained")

        # authentication and bad payloads
        rec = s3_record("s3:ObjectCreated:Put", bucket, "x.txt", 2)
        assert post_s3(daemon, "raw", rec, secret="wrong").status == 401
        assert post_s3(daemon, "raw", rec, secret=None).status == 401  # neither secret nor token
        bad = post_s3(daemon, "raw", {"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": bucket}}})
        assert bad.status == 400 and "Records.0.s3.object" in bad.body["error"]["message"], bad.text
        odd = post_s3(daemon, "raw", {**rec, "eventName": "s3:Replication:OperationFailed"})
        assert odd.status == 400 and "Records.0.eventName" in odd.body["error"]["message"]
        gcs_here = daemon.api("POST", "/events/gcs/raw", json_body={}, headers={"X-Bucketsync-Secret": SECRET})
        assert gcs_here.status == 400 and "/events/s3/raw" in gcs_here.body["error"]["message"]
        outside = {**rec, "s3": {**rec["s3"], "object": {"key": "elsewhere/x.txt"}}}
        assert post_s3(daemon, "raw", outside).body == {"accepted": 0, "ignored": 1}

        # create (posted twice: a duplicate converges), overwrite, rename (copy + delete), delete
        s3.put_object(Bucket=bucket, Key=PREFIX + "new.txt", Body=b"new!")
        created = s3_record("s3:ObjectCreated:Put", bucket, "new.txt", 10, 4)
        assert post_s3(daemon, "raw", created, created).status == 202
        wait_keys(daemon, "raw", {"first.txt", "a b.txt", "new.txt"}, "create")
        s3.put_object(Bucket=bucket, Key=PREFIX + "new.txt", Body=b"newer!")
        post_s3(daemon, "raw", s3_record("s3:ObjectCreated:Put", bucket, "new.txt", 11, 6))
        poll(lambda: catalog(daemon, "raw")["new.txt"]["size"] == 6 or None, what="overwrite")
        before = catalog(daemon, "raw")["first.txt"]["id"]
        s3.copy_object(
            Bucket=bucket, Key=PREFIX + "moved.txt", CopySource={"Bucket": bucket, "Key": PREFIX + "first.txt"}
        )
        s3.delete_object(Bucket=bucket, Key=PREFIX + "first.txt")
        post_s3(daemon, "raw", s3_record("s3:ObjectRemoved:Delete", bucket, "first.txt", 20),
                s3_record("s3:ObjectCreated:Copy", bucket, "moved.txt", 21, 1))  # fmt: skip
        after = wait_keys(daemon, "raw", {"a b.txt", "new.txt", "moved.txt"}, "rename")
        assert after["moved.txt"]["id"] == before
        # reordered and stale: the delete (newer) arrives before the create (older) of a gone object
        s3.put_object(Bucket=bucket, Key=PREFIX + "flash.txt", Body=b"f")
        s3.delete_object(Bucket=bucket, Key=PREFIX + "flash.txt")
        stale = metric(daemon, "bucketsync_events_dropped_total", dataset="raw", reason="stale")
        post_s3(daemon, "raw", s3_record("s3:ObjectRemoved:Delete", bucket, "flash.txt", 31))
        post_s3(daemon, "raw", s3_record("s3:ObjectCreated:Put", bucket, "flash.txt", 30, 1))
        poll(lambda: metric(daemon, "bucketsync_events_dropped_total", dataset="raw", reason="stale") == stale + 1
             or None, what="the stale create dropped")  # fmt: skip
        # a stale delete of new.txt (older than its last overwrite) leaves it alone
        post_s3(daemon, "raw", s3_record("s3:ObjectRemoved:Delete", bucket, "new.txt", 9))
        poll(lambda: metric(daemon, "bucketsync_events_dropped_total", dataset="raw", reason="stale") == stale + 2
             or None, what="the stale delete dropped")  # fmt: skip
        assert set(catalog(daemon, "raw")) == {"a b.txt", "new.txt", "moved.txt"}
        assert len(listing_runs(daemon, "raw")) == listings

        # lost events: changes nobody posted; the reconcile fixes them and counts exactly those
        s3.put_object(Bucket=bucket, Key=PREFIX + "unseen1.txt", Body=b"1")
        s3.put_object(Bucket=bucket, Key=PREFIX + "unseen2.txt", Body=b"2")
        s3.put_object(Bucket=bucket, Key=PREFIX + "new.txt", Body=b"changed unseen")
        s3.delete_object(Bucket=bucket, Key=PREFIX + "a b.txt")
        r = daemon.api("POST", "/datasets/raw/sync", params={"wait": "true"}, headers=AUTH)
        assert r.status == 200 and r.body["status"] == "ok", r.text
        assert set(catalog(daemon, "raw")) == {"new.txt", "moved.txt", "unseen1.txt", "unseen2.txt"}
        drift = {c: metric(daemon, "bucketsync_reconcile_drift_total", dataset="raw", change=c)
                 for c in ("added", "modified", "removed", "renamed")}  # fmt: skip
        assert drift == {"added": 2, "modified": 1, "removed": 1, "renamed": 0}

        # the failed source came back; until then the dataset was listed at once, as a poll
        started(daemon, "cat")
        assert len(listing_runs(daemon, "cat")) >= 2  # start-up, and one when the source failed
        assert daemon.events("event source failed: polling at the interval until it delivers again")
        assert daemon.events("event source delivers again: back to events mode")
        gcs_pubsub_push(daemon, fake_gcs, gbucket)
        assert daemon.stop() == 0


# ---------------------------------------------------------------------- webhook: GCS Pub/Sub push


def gcs_push(event: str, bucket: str, key: str, generation: int, size: int = 0) -> dict[str, Any]:
    """A Pub/Sub push request as a push subscription posts a Cloud Storage notification."""
    resource = {"kind": "storage#object", "bucket": bucket, "name": PREFIX + key, "generation": str(generation),
                "size": str(size)}  # fmt: skip
    return {
        "message": {
            "attributes": {
                "eventType": event,
                "bucketId": bucket,
                "objectId": PREFIX + key,
                "objectGeneration": str(generation),
                "payloadFormat": "JSON_API_V1",
                "eventTime": "2026-01-01T00:00:00.000000Z",
            },
            "data": base64.b64encode(json.dumps(resource).encode()).decode(),
            "messageId": str(generation),
        },
        "subscription": "projects/p/subscriptions/bucketsync",
    }


def upload(fake_gcs: FakeGcs, bucket: str, key: str, body: bytes) -> int:
    """Upload through the JSON API; the object's generation."""
    import urllib.parse
    import urllib.request

    name = urllib.parse.quote(PREFIX + key, safe="")
    req = urllib.request.Request(f"{fake_gcs.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}",
                                 data=body, method="POST")  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(json.loads(resp.read())["generation"])


def delete(fake_gcs: FakeGcs, bucket: str, key: str) -> None:
    import urllib.parse
    import urllib.request

    name = urllib.parse.quote(PREFIX + key, safe="")
    req = urllib.request.Request(f"{fake_gcs.url}/storage/v1/b/{bucket}/o/{name}", method="DELETE")
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def gcs_pubsub_push(daemon: Daemon, fake_gcs: FakeGcs, bucket: str) -> None:
    """finalize and delete apply; stale generations are dropped; the API token authenticates."""

    def keys() -> dict[str, int]:
        r = daemon.api("GET", "/datasets/cat/items", headers=AUTH)
        return {i["key"]: i["size"] for i in r.body["items"] if not i["key"].startswith("base")}

    def post(body: dict[str, Any]) -> Any:
        return daemon.api("POST", "/events/gcs/cat", json_body=body, headers=AUTH)

    assert daemon.api("POST", "/events/gcs/cat", json_body={}).status == 401  # no token
    g1 = upload(fake_gcs, bucket, "img.png", b"png")
    assert post(gcs_push("OBJECT_FINALIZE", bucket, "img.png", g1, 3)).status == 202
    poll(lambda: keys() == {"img.png": 3} or None, what="finalize")
    g2 = upload(fake_gcs, bucket, "img.png", b"png, bigger")
    # An overwrite sends OBJECT_DELETE for the old generation and OBJECT_FINALIZE for the new one,
    # in any order: the old generation's delete arriving last is stale.
    post(gcs_push("OBJECT_FINALIZE", bucket, "img.png", g2, 11))
    poll(lambda: keys() == {"img.png": 11} or None, what="overwrite")
    post(gcs_push("OBJECT_DELETE", bucket, "img.png", g1))
    poll(lambda: metric(daemon, "bucketsync_events_dropped_total", dataset="cat", reason="stale") == 1 or None,
         what="stale delete dropped")  # fmt: skip
    assert keys() == {"img.png": 11}
    delete(fake_gcs, bucket, "img.png")
    post(gcs_push("OBJECT_DELETE", bucket, "img.png", g2))
    poll(lambda: keys() == {} or None, what="delete")
    bad = post({"message": {"attributes": {"eventType": "OBJECT_EXPLODE"}}})
    assert bad.status == 400 and "eventType" in bad.body["error"]["message"]
    assert post({"message": {"data": "x"}}).status == 400
