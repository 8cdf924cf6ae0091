"""Helpers for end-to-end tests: a real ``bucketsync`` CLI and a real ``bucketsync run`` daemon.

Everything here talks to bucketsync the way a user does: a TOML file, subprocesses,
HTTP on a free loopback port, exit codes, stdout/stderr, and the ledger file on disk.
Nothing imports the engine, so cloud-driver tests can reuse these helpers unchanged:
build the driver dict (``{"url": "s3://bucket/prefix", "endpoint_url": ..., ...}``), pass
credentials through ``env=``, and drive the CLI and the daemon exactly as below.

    cfg = write_config(tmp_path, {"d": local_driver(folder)}, {"photos": {"driver": "d"}})
    assert cli(cfg, "sync", "photos", "--json").returncode == 0
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        daemon.api("POST", "/datasets/photos/sync")
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from emulators import free_port

T = TypeVar("T")

#: How the CLI is started: the interpreter running the tests, so the venv's bucketsync.
CLI = (sys.executable, "-m", "bucketsync.cli")
#: The documented keys of ``bucketsync sync --json``.
SYNC_KEYS = frozenset(
    {"dataset", "run", "status", "listed", "added", "modified", "removed", "renamed", "unchanged", "errors", "error"}
    | {"gaps", "dry_run"}
)
#: An unprivileged uid and gid for tests where file modes must apply (root ignores them).
NOBODY = 65534
#: The documented keys of one ``bucketsync items --json`` line.
ITEM_KEYS = frozenset(
    {"id", "key", "size", "etag", "modified", "state", "version", "content_type", "metadata", "updated"}
)
#: Defaults every test config gets unless the test says otherwise (None removes one).
DEFAULT_INTERVAL = "1s"
DEFAULT_GRACE = "2s"


# ---------------------------------------------------------------------- TOML


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    # A JSON string is a valid TOML basic string once non-ASCII stays literal
    # (JSON's surrogate-pair escapes are not valid TOML).
    return json.dumps(s, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """One TOML value: strings, paths, bools, ints, floats, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | os.PathLike):
        return _toml_str(os.fspath(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + inner + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def to_toml(doc: Mapping[str, Any]) -> str:
    """Serialise nested dicts as TOML: scalars first, then one ``[a.b]`` table per nested dict.

    ``None`` values are left out (TOML has no null).
    """
    lines: list[str] = []

    def table(path: tuple[str, ...], body: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if v is not None and not isinstance(v, Mapping)}
        tables = {k: v for k, v in body.items() if isinstance(v, Mapping)}
        if path and (scalars or not tables):
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in tables.items():
            table((*path, k), v)

    table((), doc)
    return "\n".join(lines).rstrip() + "\n"


def chown_tree(root: Path, uid: int) -> None:
    """Give ``root`` and everything under it to ``uid`` (a daemon run as that user writes there)."""
    os.chown(root, uid, uid)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, uid)


def local_driver(folder: Path | str, **options: Any) -> dict[str, Any]:
    """A driver over a local folder: ``{"url": "file:///abs/folder", **options}``."""
    return {"url": Path(folder).resolve().as_uri(), **options}


def write_config(
    tmp_path: Path,
    drivers: Mapping[str, Mapping[str, Any]],
    datasets: Mapping[str, Mapping[str, Any]],
    integrations: Mapping[str, Mapping[str, Any]] | None = None,
    agent: Mapping[str, Any] | None = None,
    *,
    name: str = "bucketsync.toml",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tmp_path/name`` and return its path.

    The agent section defaults to a ledger under ``tmp_path/var/``, a free loopback
    port and a 2 s grace; every dataset defaults to a 1 s interval. A key given as
    ``None`` in ``agent`` or a dataset removes the default. ``extra`` adds (or
    overrides) top-level sections verbatim, for tests of bad configs.
    """
    agent_conf: dict[str, Any] = {
        "ledger": str(tmp_path / "var" / "ledger.db"),
        "listen": f"127.0.0.1:{free_port()}",
        "grace": DEFAULT_GRACE,
    }
    agent_conf.update(agent or {})
    doc: dict[str, Any] = {"agent": agent_conf}
    if integrations:
        doc["integrations"] = {k: dict(v) for k, v in integrations.items()}
    doc["drivers"] = {k: dict(v) for k, v in drivers.items()}
    doc["datasets"] = {k: {"interval": DEFAULT_INTERVAL, **v} for k, v in datasets.items()}
    doc.update(extra or {})
    path = tmp_path / name
    path.write_text(to_toml(doc))
    return path


def read_config(config: Path) -> dict[str, Any]:
    with open(config, "rb") as f:
        return tomllib.load(f)


def ledger_of(config: Path, cwd: Path | None = None) -> Path:
    """The ledger file a config names (a relative path resolves against ``cwd``)."""
    ledger = Path(read_config(config).get("agent", {}).get("ledger", "var/bucketsync.db"))
    return ledger if ledger.is_absolute() else (cwd or Path.cwd()) / ledger


# ---------------------------------------------------------------------- files


def write_files(root: Path, files: Mapping[str, bytes | str]) -> None:
    """Create ``root/key`` for each key (``/``-separated), with its parents."""
    for key, data in files.items():
        path = root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)


def many_files(root: Path, folders: int, per_folder: int, *, links: bool = False) -> set[str]:
    """``folders`` x ``per_folder`` one-byte files under ``root``; returns their keys.

    ``links=True`` makes every file a hard link to one inode: to a listing each is a
    file like any other, and on a busy disk creating 15,000 links takes a fraction
    of a second where 15,000 new inodes can take tens. They share one etag, which
    only matters to a run that also removes items (rename matching).
    """
    keys: set[str] = set()
    root.mkdir(parents=True, exist_ok=True)
    source = root.parent / f".{root.name}-link-source"
    if links:
        source.write_bytes(b"x")
    for d in range(folders):
        folder = root / f"d{d:05d}"
        folder.mkdir()
        for i in range(per_folder):
            path = folder / f"f{i:04d}.bin"
            if links:
                os.link(source, path)
            else:
                path.write_bytes(b"x")
            keys.add(f"d{d:05d}/f{i:04d}.bin")
    return keys


# ---------------------------------------------------------------------- processes


def as_user(uid: int | None) -> tuple[str, ...]:
    """The argv prefix that runs a command as ``uid`` (and gid ``uid``, no other groups)."""
    return () if uid is None else ("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups")


def clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any ``BUCKETSYNC_*``, plus ``env``."""
    out = {k: v for k, v in os.environ.items() if not k.upper().startswith("BUCKETSYNC_")}
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env or {})
    return out


def cli(
    config: Path | None,
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    run_as: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``bucketsync [-c config] ARGS`` and return the finished process (text output).

    ``config=None`` leaves ``-c`` out, so ``$BUCKETSYNC_CONFIG`` or ``./bucketsync.toml``
    is used. ``run_as`` runs it under that uid (see ``as_user``).
    """
    argv = [*as_user(run_as), *CLI, *(["-c", os.fspath(config)] if config is not None else [])]
    argv += map(os.fspath, args)
    return subprocess.run(
        argv, capture_output=True, text=True, env=clean_env(env), cwd=cwd, timeout=timeout, check=False
    )


def parallel(*calls: Callable[[], T]) -> list[T]:
    """Run independent calls (typically ``lambda: cli(...)``) at once; results in order.

    CLI start-up dominates these tests' time, and independent reads need not wait in line.
    """
    with ThreadPoolExecutor(max_workers=len(calls) or 1) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    """For assertion messages: the command, its exit code and output."""
    return f"{proc.args!r} -> exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line parsed as one JSON object (fails loudly on anything else)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            obj = json.loads(line)
            assert isinstance(obj, dict), f"not a JSON object: {line!r}"
            out.append(obj)
    return out


def one_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """stdout holds exactly one JSON object on one line."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one JSON line on stdout\n{describe(proc)}"
    obj = json.loads(lines[0])
    assert isinstance(obj, dict), describe(proc)
    return obj


def sync(
    config: Path | None, dataset: str, *flags: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, dict[str, Any], subprocess.CompletedProcess[str]]:
    """``bucketsync sync DATASET --json FLAGS``: (exit code, the JSON object, the process)."""
    proc = cli(config, "sync", dataset, "--json", *flags, env=env, cwd=cwd)
    return proc.returncode, one_json(proc), proc


def items(
    config: Path | None, dataset: str, *flags: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> list[dict[str, Any]]:
    """``bucketsync items DATASET --json FLAGS`` as a list of objects (exit 0 asserted)."""
    proc = cli(config, "items", dataset, "--json", *flags, env=env, cwd=cwd)
    assert proc.returncode == 0, describe(proc)
    return json_lines(proc.stdout)


def status(
    config: Path | None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> dict[str, dict[str, Any]]:
    """``bucketsync status --json`` as {dataset name: its status} (exit 0 asserted)."""
    proc = cli(config, "status", "--json", env=env, cwd=cwd)
    assert proc.returncode == 0, describe(proc)
    return {d["dataset"]: d for d in one_json(proc)["datasets"]}


def poll(probe: Callable[[], T | None], *, timeout: float = 20.0, interval: float = 0.1, what: str = "condition") -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def query_ledger(ledger: Path, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    """A read-only query on a (possibly live) ledger; [] while the file does not exist yet."""
    if not ledger.exists():
        return []
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, tuple(params)).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []  # the agent has not created the schema yet
        raise
    finally:
        db.close()


# ---------------------------------------------------------------------- the daemon


@dataclass
class Response:
    status: int
    body: Any  # parsed JSON, or text when the body is not JSON
    headers: Mapping[str, str]

    @property
    def text(self) -> str:
        return self.body if isinstance(self.body, str) else json.dumps(self.body)


_STARTED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftover_daemons() -> None:
    """A safety net: no daemon this module started outlives the test run."""
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class Daemon:
    """A ``bucketsync run`` subprocess on the config's ``agent.listen``, logging to a file.

    ``with Daemon(cfg) as d:`` starts it and waits for ``/healthz``; leaving the block
    stops it with SIGTERM (SIGKILL if it does not exit in time). ``stop(sig)`` returns
    the exit code; ``log`` is everything it wrote to stdout and stderr.
    """

    _count = 0

    def __init__(
        self,
        config: Path | None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
        listen: str | None = None,
        preexec_fn: Callable[[], None] | None = None,
        run_as: int | None = None,
    ) -> None:
        self.config = config
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. a prctl the test wants)
        self.run_as = run_as
        self.env = dict(env or {})
        self.cwd = cwd
        if listen is None:
            listen = self.env.get("BUCKETSYNC_AGENT__LISTEN")
        if listen is None:
            if config is None:
                raise ValueError("pass listen= when the config comes from the environment or the cwd")
            listen = read_config(config).get("agent", {}).get("listen", "127.0.0.1:9810")
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        cert = read_config(config).get("agent", {}).get("tls_cert_file") if config is not None else None
        #: with agent.tls_cert_file set, requests go over HTTPS trusting that certificate
        self.ssl = ssl.create_default_context(cafile=cert) if cert else None
        self.url = f"{'https' if cert else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
        Daemon._count += 1
        base = cwd or (config.parent if config is not None else Path.cwd())
        self.log_path = log_path or base / f"daemon-{Daemon._count}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- life cycle

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> Daemon:
        argv = [
            *as_user(self.run_as),
            *CLI,
            *(["-c", os.fspath(self.config)] if self.config is not None else []),
            "run",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=clean_env(self.env),
                cwd=self.cwd,
                start_new_session=True,  # a Ctrl-C in the test terminal does not reach it
                preexec_fn=self.preexec_fn,
            )
        _STARTED.append(self.proc)
        if wait:
            try:
                self.wait_healthy(timeout)
            except BaseException:
                self.close()
                raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon was not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout: float = 20.0) -> None:
        def healthy() -> bool:
            if not self.running:
                raise AssertionError(f"the daemon exited ({self.returncode}) before /healthz answered\n{self.log}")
            try:
                return self.get("/healthz", timeout=1).status == 200
            except OSError:
                return False

        poll(healthy, timeout=timeout, interval=0.05, what=f"{self.url}/healthz")

    def wait_ready(self, timeout: float = 20.0) -> Response:
        return poll(
            lambda: r if (r := self.get("/readyz")).status == 200 else None, timeout=timeout, what="/readyz 200"
        )

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit code (raises TimeoutExpired if it hangs)."""
        if self.running:
            self.send(sig)
        return self.wait(timeout)

    def kill(self) -> int:
        """``kill -9``."""
        if self.running:
            self.send(signal.SIGKILL)
        return self.wait(10)

    def __enter__(self) -> Daemon:
        return self.start() if self.proc is None else self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if not self.running:
            return
        try:
            self.stop(signal.SIGTERM, timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    # -- output

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """Every log line as JSON (the daemon logs JSON lines when stderr is not a TTY)."""
        return json_lines(self.log)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("event") == event]

    # -- HTTP

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Response:
        url = self.url + path + (("?" + urllib.parse.urlencode(params)) if params else "")
        data = json.dumps(json_body).encode() if json_body is not None else None
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl) as resp:
                status, raw, rh = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            status, raw, rh = exc.code, exc.read(), dict(exc.headers)
        text = raw.decode(errors="replace")
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return Response(status, body, rh)

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Response:
        return self.request("POST", path, **kw)

    def api(self, method: str, path: str, **kw: Any) -> Response:
        """A call under ``/api/v1``."""
        return self.request(method, "/api/v1" + path, **kw)
