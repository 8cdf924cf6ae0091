"""Fixtures shared by every test module; emulator fixtures live in tests/emulators/."""

from __future__ import annotations

pytest_plugins = [
    "emulators.s3",
    "emulators.gcs",
    "emulators.azure",
]
