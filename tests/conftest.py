"""Fixtures shared by every test module; emulator fixtures live in tests/emulators/."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
