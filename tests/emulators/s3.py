"""S3 emulators: SeaweedFS (fast, auth and per-identity permissions) and moto (rich, slow).

Session fixtures start one server each on free ports; function fixtures hand out a
fresh bucket (or store) per test, so tests never see each other's objects.

SeaweedFS runs as ``weed mini`` with an identities file: an admin identity for the
ordinary stores and a read+list identity for the permission tests, so one process
serves both. ``-s3.autoCreateBucket=false`` because SeaweedFS otherwise creates a
missing bucket on upload (AWS never does; the missing-bucket checks need that).
"""

from __future__ import annotations

import functools
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from bucketsync.stores.s3 import S3Store
from emulators import free_port, start, stop, venv_bin

REGION = "us-east-1"
PREFIX = "some/prefix/"


@dataclass(frozen=True)
class S3Emulator:
    """One running S3-compatible server and the keys to use it."""

    name: str
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    #: keys of an identity that may read and list but not write (SeaweedFS only)
    readonly: tuple[str, str] | None = None

    @functools.cached_property
    def _client(self) -> Any:
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )

    def client(self) -> Any:
        """A plain (sync) botocore client with the admin keys, for fixtures and out-of-band checks."""
        return self._client

    @functools.cached_property
    def _sqs(self) -> Any:
        return botocore.session.get_session().create_client(
            "sqs",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(retries={"total_max_attempts": 1}),
        )

    def sqs(self) -> Any:
        """A sync SQS client (moto serves SQS on the S3 port), for queues the event tests read."""
        return self._sqs

    def new_queue(self, **attributes: str) -> str:
        """Create a queue with a fresh name (``attributes`` such as VisibilityTimeout) and return its URL."""
        url: str = self.sqs().create_queue(QueueName=f"q-{uuid.uuid4().hex[:20]}", Attributes=attributes)["QueueUrl"]
        return url

    def new_bucket(self) -> str:
        """Create a bucket with a fresh unique name and return the name."""
        name = f"bs-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def store(self, bucket: str, prefix: str = PREFIX, *, readonly: bool = False, **kwargs: Any) -> S3Store:
        key_id, secret = self.readonly if readonly and self.readonly else (self.access_key_id, self.secret_access_key)
        return S3Store(
            bucket,
            prefix,
            endpoint_url=self.endpoint_url,
            region=REGION,
            access_key_id=key_id,
            secret_access_key=secret,
            **kwargs,
        )


def _port_with_grpc() -> int:
    """A free port P whose P+10000 is free too: weed's components find each other's
    gRPC ports at that offset, whatever the flags say."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (P, P+10000) on 127.0.0.1")


def _wait_for_s3(emulator: S3Emulator, timeout: float = 20.0) -> None:
    """The S3 port opens before the filer behind it is ready: wait until a request works."""
    deadline = time.monotonic() + timeout
    client = emulator.client()
    while True:
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{emulator.name} at {emulator.endpoint_url} is not answering: {exc}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Emulator]:
    weed = venv_bin("weed")  # EmulatorMissing (a failure, not a skip) when absent
    root: Path = tmp_path_factory.mktemp("seaweedfs")
    admin = ("bucketsync-admin", "bucketsync-admin-secret")
    reader = ("bucketsync-reader", "bucketsync-reader-secret")
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": admin[0], "secretKey": admin[1]}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": reader[0], "secretKey": reader[1]}],
                "actions": ["Read", "List"],
            },
        ]
    }
    (root / "identities.json").write_text(json.dumps(identities))
    (root / "data").mkdir()
    ports = {name: _port_with_grpc() for name in ("master", "volume", "filer", "s3", "admin")}
    argv = [
        weed,
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-s3.autoCreateBucket=false",
        # A bucket is a collection with a volume of its own, and by default the number of volumes is
        # free disk / volume size (60 here): past that a suite's worker gets InternalError on every
        # new bucket. Test volumes are small and grow as written (not preallocated).
        "-volume.max=2000",
        f"-s3.config={root / 'identities.json'}",
        *(f"-{name}.port={port}" for name, port in ports.items()),
    ]
    # The env keys switch auth on even without the identities file (see EMULATORS.md).
    env = {"AWS_ACCESS_KEY_ID": admin[0], "AWS_SECRET_ACCESS_KEY": admin[1]}
    proc = start(argv, ports["s3"], env=env, what="SeaweedFS (weed mini)", log=root / "weed.log")
    try:
        emulator = S3Emulator("seaweedfs", f"http://127.0.0.1:{ports['s3']}", *admin, readonly=reader)
        _wait_for_s3(emulator)
        yield emulator
    finally:
        stop(proc, grace=0.5)  # throwaway data: no need to wait ~3 s for a clean shutdown


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Emulator]:
    moto = venv_bin("moto_server")
    root: Path = tmp_path_factory.mktemp("moto")
    port = free_port()
    proc = start([moto, "-H", "127.0.0.1", "-p", str(port)], port, what="moto server", log=root / "moto.log")
    try:
        # moto does not check signatures: any key works (wrong-key tests use SeaweedFS).
        emulator = S3Emulator("moto", f"http://127.0.0.1:{port}", "moto-key", "moto-secret")
        _wait_for_s3(emulator)
        yield emulator
    finally:
        stop(proc, grace=3.0)


@pytest.fixture
def s3_config(seaweedfs: S3Emulator) -> dict[str, Any]:
    """Config fragments for a fresh bucket on SeaweedFS, plain strings only (they go into TOML).

    ``integrations`` maps one aws integration name to its table; ``driver`` is a driver
    table using it: ``s3://<fresh bucket>/some/prefix/`` with the emulator's endpoint.
    """
    bucket = seaweedfs.new_bucket()
    return {
        "integrations": {
            "aws_test": {
                "kind": "aws",
                "access_key_id": seaweedfs.access_key_id,
                "secret_access_key": seaweedfs.secret_access_key,
            }
        },
        "driver": {
            "url": f"s3://{bucket}/{PREFIX}",
            "integration": "aws_test",
            "endpoint_url": seaweedfs.endpoint_url,
            "region": REGION,
        },
    }


@pytest.fixture
async def s3_store(seaweedfs: S3Emulator) -> AsyncIterator[S3Store]:
    """A fresh, empty store (page size 10) on its own SeaweedFS bucket, under a prefix."""
    store = seaweedfs.store(seaweedfs.new_bucket(), page_size=10)
    yield store
    await store.aclose()


@pytest.fixture
async def s3_moto_store(moto_s3: S3Emulator) -> AsyncIterator[S3Store]:
    """A fresh, empty store (page size 10) on its own moto bucket, under a prefix."""
    store = moto_s3.store(moto_s3.new_bucket(), page_size=10)
    yield store
    await store.aclose()


@pytest.fixture
async def s3_readonly_store(seaweedfs: S3Emulator) -> AsyncIterator[S3Store]:
    """A store whose credentials may read and list but not write, on a bucket holding one object."""
    bucket = seaweedfs.new_bucket()
    seaweedfs.client().put_object(Bucket=bucket, Key=f"{PREFIX}existing", Body=b"readable")
    store = seaweedfs.store(bucket, readonly=True, page_size=10)
    yield store
    await store.aclose()
