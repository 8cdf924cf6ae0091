"""Fixtures shared by every test module; emulator fixtures live in tests/emulators/."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bucketsync.ledger.ledger import Ledger

pytest_plugins = [
    "emulators.s3",
    "emulators.gcs",
    "emulators.azure",
    "emulators.postgres",
]


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    """A fresh SQLite ledger file, closed after the test."""
    led = await Ledger.open(tmp_path / "ledger.db")
    try:
        yield led
    finally:
        await led.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder an unprivileged user can reach (pytest's tmp_path is private to root); removed
    after the test whatever modes the test left on its sub-folders."""
    base = Path(tempfile.mkdtemp(prefix="bucketsync-shared-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for folder, dirs, _ in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(folder, d), 0o755)
        shutil.rmtree(base)
