"""``bucketsync doctor``: an operator's first five minutes, in one report.

It checks, in order, and keeps going after a failure so the report is complete:
the configuration parses; every driver's permission probe passes; the ledger's
folder is writable and its schema is migrated (or will be, on start); the listen
port is free (or held by this ledger's running agent); and this machine's clock
agrees with the storage's ``Date`` header (signed requests fail when clocks drift
by minutes). Nothing here changes the ledger: a fresh one is not created.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import os
import socket
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bucketsync.config import DriverConfig, Settings, load_settings
from bucketsync.core.errors import BucketsyncError, ConfigError, LedgerError
from bucketsync.ledger.sqlite import MIGRATIONS, InstanceLock
from bucketsync.stores import open_store
from bucketsync.upstream.probe import driver_takes_writes, probe

#: clock skew beyond this fails (S3 refuses signatures more than 15 minutes off; warn well before)
MAX_SKEW = 60.0
PROBE_TIMEOUT = 30.0
OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(slots=True)
class Finding:
    check: str
    status: str  # ok | warn | FAIL
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail}


class Report:
    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, check: str, status: str, detail: str) -> None:
        self.findings.append(Finding(check, status, detail))

    @property
    def ok(self) -> bool:
        return all(f.status != FAIL for f in self.findings)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [f.as_json() for f in self.findings]}

    def text(self) -> str:
        width = max((len(f.check) for f in self.findings), default=0)
        lines = [f"{f.status:<4}  {f.check:<{width}}  {f.detail}" for f in self.findings]
        failed = sum(f.status == FAIL for f in self.findings)
        lines.append("all checks passed" if not failed else f"{failed} check(s) failed")
        return "\n".join(lines)


async def run_doctor(config: str | None) -> Report:
    report = Report()
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        report.add("config", FAIL, str(exc))
        return report
    n = (len(settings.integrations), len(settings.drivers), len(settings.datasets))
    report.add("config", OK, f"parses: {n[0]} integrations, {n[1]} drivers, {n[2]} datasets")
    file = settings.agent.ledger_file
    running = file is not None and InstanceLock(file).held_by_other()
    await asyncio.gather(*(_driver(report, settings, name) for name in sorted(settings.drivers)))
    if file is not None:
        _ledger(report, file, running)
    else:
        await _postgres_ledger(report, settings)
    _port(report, settings, running)
    return report


async def _driver(report: Report, settings: Settings, name: str) -> None:
    driver = settings.drivers[name]
    try:
        store = open_store(driver, settings)
    except BucketsyncError as exc:
        report.add(f"driver {name}", FAIL, str(exc))
        return
    try:
        result = await asyncio.wait_for(
            probe(store, name, driver.allow_delete, writes=driver_takes_writes(settings, name)), PROBE_TIMEOUT
        )
        report.add(f"driver {name}", OK if result.ok else FAIL, result.summary())
    except TimeoutError:
        report.add(f"driver {name}", FAIL, f"the permission probe got no answer in {PROBE_TIMEOUT:g}s")
    finally:
        await store.aclose()
    await _clock(report, name, driver, settings)


# -- ledger ------------------------------------------------------------------------


def _ledger(report: Report, path: Path, running: bool) -> None:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the agent creates missing folders
        folder = folder.parent
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            report.add("ledger", FAIL, f"{path}: not readable and writable by uid {os.getuid()}")
            return
        try:
            version = _schema_version(path)
        except sqlite3.Error as exc:
            report.add("ledger", FAIL, f"{path}: not a readable SQLite ledger ({exc})")
            return
        want = len(MIGRATIONS)
        if version > want:
            report.add("ledger", FAIL, f"{path}: schema {version} is newer than this bucketsync ({want}): upgrade it")
        elif version < want:
            report.add("ledger", WARN, f"{path}: schema {version} of {want}; the agent migrates it on start")
        else:
            report.add(
                "ledger", OK, f"{path}: schema {version}, migrated" + (", in use by the agent" if running else "")
            )
    elif not _writable_folder(folder):
        report.add("ledger", FAIL, f"{path}: cannot create it, {folder} is not a writable folder for uid {os.getuid()}")
        return
    else:
        report.add("ledger", OK, f"{path}: does not exist yet; the agent creates it (folder writable)")
    if not _writable_folder(folder):  # WAL and -shm files, the staging folder
        report.add("ledger", FAIL, f"{folder}: not a writable folder; SQLite needs it for the WAL and staging")


async def _postgres_ledger(report: Report, settings: Settings) -> None:
    """A PostgreSQL ledger: reachable with its password, at this code's schema version."""
    from bucketsync.ledger.ledger import Ledger
    from bucketsync.ledger.postgres import SCHEMA_VERSION, redact

    conf = settings.agent
    where = redact(str(conf.ledger))
    try:
        ledger = await Ledger.open(conf.ledger, readonly=True, password=conf.ledger_password())
    except LedgerError as exc:
        if "no bucketsync schema yet" in str(exc):
            report.add("ledger", OK, f"{where}: reachable, empty; the agent creates the schema")
        else:
            report.add("ledger", FAIL, str(exc))
        return
    await ledger.close()
    report.add("ledger", OK, f"{where}: schema {SCHEMA_VERSION}")


def _schema_version(path: Path) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("PRAGMA user_version").fetchone()
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return int(row[0])
    finally:
        db.close()


def _writable_folder(folder: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".bucketsync-doctor-"):
            return True
    except OSError:
        return False


# -- port --------------------------------------------------------------------------


def _port(report: Report, settings: Settings, running: bool) -> None:
    conf = settings.agent
    if running:
        report.add("listen", OK, f"{conf.listen}: served by the agent that holds this ledger")
        return
    family = socket.AF_INET6 if ":" in conf.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((conf.host, conf.port))
        report.add("listen", OK, f"{conf.listen}: free")
    except OSError as exc:
        why = "in use by another process" if exc.errno == errno.EADDRINUSE else exc.strerror
        report.add("listen", FAIL, f"{conf.listen}: {why}")
    if not conf.is_loopback() and conf.api_token is None and conf.api_token_file is None:
        report.add("listen", FAIL, f"{conf.listen} is not loopback and no API token is set (agent.api_token_file)")


# -- clock -------------------------------------------------------------------------


def storage_endpoint(driver: DriverConfig) -> str | None:
    """Where the driver's storage answers HTTP (any answer carries a ``Date``); None for local ones."""
    loc = driver.location
    if loc.scheme == "s3":
        return driver.endpoint_url or f"https://s3.{driver.region or 'us-east-1'}.amazonaws.com"
    if loc.scheme == "gs":
        from bucketsync.stores.gcs import endpoint

        return endpoint(driver.endpoint_url)[0]
    if loc.scheme == "az":
        return driver.endpoint_url or f"https://{loc.account}.blob.core.windows.net"
    return None


async def _clock(report: Report, name: str, driver: DriverConfig, settings: Settings) -> None:
    url = storage_endpoint(driver)
    if url is None:
        report.add(f"clock {name}", OK, "local storage: same clock")
        return
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.head(url, allow_redirects=False) as resp,
        ):
            header = resp.headers.get("Date")
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.add(f"clock {name}", WARN, f"{url} did not answer ({type(exc).__name__}); clock not checked")
        return
    if header is None:
        report.add(f"clock {name}", WARN, f"{url} sent no Date header; clock not checked")
        return
    skew = time.time() - email.utils.parsedate_to_datetime(header).timestamp()
    status = OK if abs(skew) <= MAX_SKEW else FAIL
    direction = "ahead of" if skew > 0 else "behind"
    report.add(f"clock {name}", status, f"{abs(skew):.0f}s {direction} {url} (limit {MAX_SKEW:g}s)")
