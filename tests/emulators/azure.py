"""Azurite (Azure Blob and Queue emulators) for the tests, pinned in tests/azurite/package.json.

Install once with ``npm ci --prefix tests/azurite``; a missing install fails the
tests that need it (``EmulatorMissing``), it never skips them.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.storage.blob import ContainerClient, ContainerSasPermissions, generate_container_sas
from azure.storage.queue import QueueClient
from pydantic import SecretStr

from bucketsync.config import AzureIntegration, DriverConfig
from bucketsync.stores.azure import AzureStore, open_azure
from emulators import REPO, EmulatorMissing, free_port, start, stop

AZURITE_BIN = REPO / "tests" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
#: the Queue service, from the same package (Event Grid delivers blob events to Storage Queues)
AZURITE_QUEUE_BIN = AZURITE_BIN.with_name("azurite-queue")
INSTALL = "npm ci --prefix tests/azurite"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key: public, documented, and only good for the emulator.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
PREFIX = "some/prefix/"


@dataclass(frozen=True)
class Azurite:
    port: int
    #: the Blob endpoint, account segment included (path-style, as Azurite serves it)
    endpoint: str
    connection_string: str
    account: str = ACCOUNT
    account_key: str = ACCOUNT_KEY

    def container(self, name: str) -> ContainerClient:
        """A sync client for test setup (creating containers, inspecting blobs)."""
        return ContainerClient.from_connection_string(self.connection_string, name)

    def read_only_sas(self, container: str) -> str:
        """A SAS token allowing read and list on ``container``, nothing else."""
        return generate_container_sas(
            ACCOUNT,
            container,
            account_key=ACCOUNT_KEY,
            permission=ContainerSasPermissions(read=True, list=True),
            expiry=datetime.now(UTC) + timedelta(hours=2),
        )


def _azurite_argv(port: int, location: str, service: str = "blob") -> list[str]:
    binary = AZURITE_BIN if service == "blob" else AZURITE_QUEUE_BIN
    if shutil.which("node") is None:
        raise EmulatorMissing(f"node is not installed (Azurite needs node >= 20); then run `{INSTALL}`")
    if not binary.exists():
        raise EmulatorMissing(f"Azurite is not installed: run `{INSTALL}` in the repository root")
    return [
        str(binary),
        f"--{service}Host", "127.0.0.1",
        f"--{service}Port", str(port),
        "--location", location,
        "--skipApiVersionCheck",  # the SDK may be newer than the emulator
        "--loose",
        "--disableTelemetry",  # otherwise it tries to reach the internet
        "--silent",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """One Azurite Blob service per test session, on a free port, data in a temp folder."""
    base = tmp_path_factory.mktemp("azurite")
    port = free_port()
    proc = start(_azurite_argv(port, str(base / "data")), port, what="azurite", log=base / "azurite.log")
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    conn = f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint={endpoint};"
    try:
        yield Azurite(port=port, endpoint=endpoint, connection_string=conn)
    finally:
        stop(proc)


@dataclass(frozen=True)
class AzuriteQueue:
    """Azurite's Queue service: ``endpoint`` is the Queue endpoint, account segment included."""

    port: int
    endpoint: str
    connection_string: str

    def queue(self, name: str) -> QueueClient:
        """A sync client for test setup: create queues, enqueue Event Grid messages, peek."""
        return QueueClient.from_connection_string(self.connection_string, name)

    def new_queue(self, **options: Any) -> str:
        """Create a queue with a fresh name and return the name."""
        name = f"q{uuid.uuid4().hex[:20]}"
        self.queue(name).create_queue(**options)
        return name


@pytest.fixture(scope="session")
def azurite_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteQueue]:
    """One Azurite Queue service per test session (a separate process from the Blob service)."""
    base = tmp_path_factory.mktemp("azurite-queue")
    port = free_port()
    argv = _azurite_argv(port, str(base / "data"), service="queue")
    proc = start(argv, port, what="azurite-queue", log=base / "azurite-queue.log")
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    conn = f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};QueueEndpoint={endpoint};"
    try:
        yield AzuriteQueue(port=port, endpoint=endpoint, connection_string=conn)
    finally:
        stop(proc)


@pytest.fixture
def azure_container(azurite: Azurite) -> str:
    """A fresh, empty container's name."""
    name = f"t{uuid.uuid4().hex[:20]}"
    azurite.container(name).create_container()
    return name


@pytest.fixture
def azure_config(azurite: Azurite, azure_container: str) -> dict[str, Any]:
    """Config fragments for a fresh container on Azurite, plain strings only (they go into TOML).

    ``integrations`` maps one azure integration name to its table (the devstoreaccount1
    connection string, BlobEndpoint included, so no ``endpoint_url`` is needed); ``driver``
    is a driver table using it: ``az://devstoreaccount1/<fresh container>/some/prefix/``.
    """
    return {
        "integrations": {"azure_test": {"kind": "azure", "connection_string": azurite.connection_string}},
        "driver": {"url": f"az://{ACCOUNT}/{azure_container}/{PREFIX}", "integration": "azure_test"},
    }


def make_store(azurite: Azurite, container: str, prefix: str = PREFIX, **options: Any) -> AzureStore:
    """An AzureStore built the way the agent builds one: URL + integration through ``open_azure``."""
    driver = DriverConfig(url=f"az://{ACCOUNT}/{container}/{prefix}", integration="azure")
    integration = AzureIntegration(kind="azure", connection_string=SecretStr(azurite.connection_string))
    options.setdefault("page_size", 10)
    options.setdefault("retry_base", 0.01)
    return open_azure(driver.location, driver, integration, **options)


@pytest.fixture
async def azure_store(azurite: Azurite, azure_container: str) -> AsyncIterator[AzureStore]:
    """A fresh AzureStore (page_size=10) on a fresh container, prefix ``some/prefix/``."""
    store = make_store(azurite, azure_container)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def azure_readonly_store(azurite: Azurite, azure_container: str) -> AsyncIterator[AzureStore]:
    """The same container and prefix as ``azure_store``, through a read+list-only SAS token."""
    driver = DriverConfig(
        url=f"az://{ACCOUNT}/{azure_container}/{PREFIX}", integration="ro", endpoint_url=azurite.endpoint
    )
    integration = AzureIntegration(kind="azure", sas_token=SecretStr(azurite.read_only_sas(azure_container)))
    store = open_azure(driver.location, driver, integration, page_size=10, retry_base=0.01)
    try:
        yield store
    finally:
        await store.aclose()
