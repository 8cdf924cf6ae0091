"""The CLI imports what a command needs: ``--version`` and ``--help`` load none of the heavy modules.

Start-up time is a benchmark figure (docs/benchmarks.md), never asserted here; what is asserted is the
cause of it: which modules a real ``bucketsync`` process has loaded when it answers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_the_command_freezes_what_is_left_for_a_quick_exit() -> None:
    """``bucketsync`` (``entry``) returns ``main``'s code with the objects left frozen, so the
    interpreter's exit skips its last full collection; ``main`` alone leaves collection as it was."""
    probe = (
        "import gc, sys\n"
        "from bucketsync.cli.main import entry, main\n"
        "for name, run in (('MAIN', main), ('ENTRY', entry)):\n"
        "    try:\n"
        "        code = run(['--version'])\n"
        "    except SystemExit as stop:  # argparse's --version exits\n"
        "        code = stop.code\n"
        "    print(name, code, gc.get_freeze_count())\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("MAIN", "ENTRY")))
    assert lines["MAIN"] == "0 0"
    code, frozen = lines["ENTRY"].split()
    assert code == "0" and int(frozen) > 1000


def test_the_collector_is_off_through_start_up_and_on_for_the_work(tmp_path: Path) -> None:
    """``entry`` keeps the collector off while start-up builds what lives as long as the process,
    then freezes that and turns it back on as the command's work starts (``asyncio.run``); a
    process calling ``main`` (the tests) keeps collecting all along, with nothing frozen."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a")
    config = tmp_path / "bucketsync.toml"
    config.write_text(
        f'[agent]\nledger = "{tmp_path / "ledger.db"}"\n\n[drivers.d]\nurl = "file://{tmp_path / "data"}/"\n\n'
        '[datasets.ds]\ndriver = "d"\nsync = "manual"\n'
    )
    probe = (
        "import asyncio, gc, sys\n"
        "run = asyncio.run\n"
        "def watched(work, **kw):\n"
        "    print('AT_WORK', gc.isenabled(), gc.get_freeze_count(), file=sys.stderr)\n"
        "    return run(work, **kw)\n"
        "asyncio.run = watched\n"
        "from bucketsync.cli import main as cli\n"
        "sys.exit(getattr(cli, sys.argv[1])(sys.argv[2:]))\n"
    )
    argv = ["-c", str(config), "sync", "ds"]
    through_entry = subprocess.run(
        [sys.executable, "-c", probe, "entry", *argv], capture_output=True, text=True, check=True
    )
    assert "ds: ok" in through_entry.stdout
    enabled, frozen = through_entry.stderr.split("AT_WORK ", 1)[1].split()[:2]
    assert enabled == "True" and int(frozen) > 10_000  # start-up's objects, frozen before the work
    through_main = subprocess.run(
        [sys.executable, "-c", probe, "main", *argv], capture_output=True, text=True, check=True
    )
    assert through_main.stderr.split("AT_WORK ", 1)[1].split()[:2] == ["True", "0"]
