"""The CLI imports what a command needs: ``--version`` and ``--help`` load none of the heavy modules.

Start-up time is a benchmark figure (docs/benchmarks.md), never asserted here; what is asserted is the
cause of it: which modules a real ``bucketsync`` process has loaded when it answers.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = (
    "asyncio",
    "aiohttp",
    "pydantic",
    "aiobotocore",
    "botocore",
    "structlog",
    "bucketsync.agent",
    "bucketsync.config",
)

PROBE = """
import sys
from bucketsync.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
loaded = [m for m in {heavy!r} if m in sys.modules]
print("LOADED", ",".join(loaded), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["sync", "--help"]])
def test_version_and_help_load_no_heavy_module(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True, check=True
    )
    assert "bucketsync" in proc.stdout or "usage" in proc.stdout
    loaded = proc.stderr.rsplit("LOADED", 1)[1].strip()
    assert loaded == "", f"{argv} loaded {loaded}"
