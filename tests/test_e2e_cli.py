"""The real ``bucketsync`` CLI, as subprocesses, against local folders in ``tmp_path``.

No daemon runs here: ``sync`` works in-process on the ledger, ``items`` and ``status``
read it. Each test checks what a user sees: exit codes, stdout JSON, stderr messages.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from e2e import (
    ITEM_KEYS,
    SYNC_KEYS,
    cli,
    describe,
    items,
    ledger_of,
    local_driver,
    one_json,
    parallel,
    query_ledger,
    status,
    sync,
    write_config,
    write_files,
)

FILES = {
    "a.txt": "alpha",
    "b.txt": "bravo",
    "c.txt": "charlie",
    "d.txt": "delta-delta",
    "sub/e.txt": "echo",
}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_files(root, FILES)
    return root


@pytest.fixture
def config(tmp_path: Path, folder: Path) -> Path:
    return write_config(tmp_path, {"local": local_driver(folder)}, {"photos": {"driver": "local"}})


def ledger_rows(config: Path) -> list[tuple[object, ...]]:
    """Every item row, straight from the ledger file (to prove a command wrote nothing)."""
    return query_ledger(ledger_of(config), "SELECT id, key, size, etag, modified, state FROM items ORDER BY id")


def by_key(rows: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {r["key"]: r for r in rows}


# ---------------------------------------------------------------------- sync


def test_sync_json_counts_initial_then_add_modify_delete_rename(config: Path, folder: Path) -> None:
    code, out, proc = sync(config, "photos")
    assert code == 0, describe(proc)
    assert set(out) == SYNC_KEYS
    assert out["dataset"] == "photos"
    assert out["status"] == "ok"
    assert isinstance(out["run"], int)
    assert out["error"] is None
    assert out["dry_run"] is False
    assert {k: out[k] for k in ("listed", "added", "modified", "removed", "renamed", "unchanged", "errors")} == {
        "listed": 5,
        "added": 5,
        "modified": 0,
        "removed": 0,
        "renamed": 0,
        "unchanged": 0,
        "errors": 0,
    }
    before = by_key(items(config, "photos"))
    assert set(before) == set(FILES)

    (folder / "new.txt").write_text("november")  # add
    (folder / "b.txt").write_text("bravo, but longer now")  # modify (new size, new mtime)
    (folder / "c.txt").unlink()  # delete
    (folder / "d.txt").rename(folder / "sub" / "d-moved.txt")  # rename: same bytes, same inode
    code, out, proc = sync(config, "photos")
    assert code == 0, describe(proc)
    assert {k: out[k] for k in ("status", "listed", "added", "modified", "removed", "renamed", "unchanged")} == {
        "status": "ok",
        "listed": 5,  # a, b, new, sub/d-moved, sub/e
        "added": 1,
        "modified": 1,
        "removed": 1,
        "renamed": 1,
        "unchanged": 2,
    }
    after = by_key(items(config, "photos"))
    assert set(after) == {"a.txt", "b.txt", "new.txt", "sub/d-moved.txt", "sub/e.txt"}
    assert after["sub/d-moved.txt"]["id"] == before["d.txt"]["id"], "a rename keeps the item's id"
    assert after["b.txt"]["id"] == before["b.txt"]["id"]
    assert after["b.txt"]["size"] == len("bravo, but longer now")
    assert after["b.txt"]["etag"] != before["b.txt"]["etag"]

    code, out, proc = sync(config, "photos")  # nothing changed since
    assert code == 0, describe(proc)
    counts = {k: out[k] for k in ("listed", "unchanged", "added", "modified", "removed", "renamed")}
    assert counts == {"listed": 5, "unchanged": 5, "added": 0, "modified": 0, "removed": 0, "renamed": 0}


def test_dry_run_writes_nothing(config: Path, folder: Path) -> None:
    code, out, proc = sync(config, "photos", "--dry-run")
    assert code == 0, describe(proc)
    assert set(out) == SYNC_KEYS | {"would_remove", "would_rename"}, "a dry run adds its plan"
    assert out["dry_run"] is True
    assert out["run"] is None
    assert (out["status"], out["listed"], out["added"]) == ("ok", 5, 5)
    assert items(config, "photos") == []
    assert query_ledger(ledger_of(config), "SELECT count(*) FROM runs") in ([], [(0,)]), "no run record"

    # After a real sync, a dry run over changes reports them and still writes nothing.
    assert sync(config, "photos")[0] == 0
    before = ledger_rows(config)
    (folder / "a.txt").unlink()
    (folder / "zz.txt").write_text("new")
    code, out, proc = sync(config, "photos", "--dry-run")
    assert code == 0, describe(proc)
    assert (out["added"], out["removed"], out["dry_run"]) == (1, 1, True)
    assert ledger_rows(config) == before
    assert query_ledger(ledger_of(config), "SELECT count(*) FROM runs")[0][0] == 1


def test_guard_aborts_mass_delete_then_force_passes(config: Path, folder: Path) -> None:
    assert sync(config, "photos")[0] == 0
    before = ledger_rows(config)
    for key in ("a.txt", "b.txt", "c.txt", "d.txt"):  # 4 of 5 = 80% > max_delete_ratio 0.5
        (folder / key).unlink()

    code, out, proc = sync(config, "photos")
    assert code == 1, describe(proc)
    assert out["status"] == "aborted"
    assert out["removed"] == 0
    assert "max_delete_ratio" in out["error"] and "--force" in out["error"], out["error"]
    assert "4 of 5" in out["error"]
    assert ledger_rows(config) == before, "an aborted run removes nothing"

    human = cli(config, "sync", "photos")
    assert human.returncode == 1, describe(human)
    assert "aborted" in human.stdout
    assert "error: " in human.stderr and "max_delete_ratio" in human.stderr, describe(human)
    assert ledger_rows(config) == before

    code, out, proc = sync(config, "photos", "--force")
    assert code == 0, describe(proc)
    assert (out["status"], out["removed"], out["error"]) == ("ok", 4, None)
    assert [row[1] for row in ledger_rows(config)] == ["sub/e.txt"]


def test_missing_driver_root_fails_the_run_and_removes_nothing(config: Path, folder: Path) -> None:
    assert sync(config, "photos")[0] == 0
    before = ledger_rows(config)
    shutil.rmtree(folder)

    code, out, proc = sync(config, "photos")
    assert code == 1, describe(proc)
    assert out["status"] == "failed"
    assert out["removed"] == 0
    assert out["errors"] >= 1
    assert "does not exist" in out["error"] and str(folder) in out["error"], out["error"]
    assert ledger_rows(config) == before


def test_unknown_dataset_is_a_clear_error(config: Path) -> None:
    procs = parallel(lambda: cli(config, "sync", "nope", "--json"), lambda: cli(config, "items", "nope", "--json"))
    for proc in procs:
        assert proc.returncode != 0, describe(proc)
        assert "no dataset named 'nope'" in proc.stderr, describe(proc)
        assert "photos" in proc.stderr, "the message lists the datasets there are"
        assert proc.stdout == ""
        assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- items and status


def test_items_json_and_prefix(config: Path, folder: Path) -> None:
    assert sync(config, "photos")[0] == 0
    rows = items(config, "photos")
    assert [r["key"] for r in rows] == sorted(FILES), "ascending key order"
    for r in rows:
        assert set(r) == ITEM_KEYS, r
        assert r["state"] == "live"
        assert r["size"] == len(FILES[r["key"]])
        assert isinstance(r["id"], int)
        assert r["etag"]
        assert ISO_UTC.match(r["modified"]), r["modified"]
    assert len({r["id"] for r in rows}) == len(rows)

    sub, human = parallel(
        lambda: items(config, "photos", "--prefix", "sub/"),
        lambda: cli(config, "items", "photos", "--prefix", "b"),
    )
    assert [r["key"] for r in sub] == ["sub/e.txt"]
    assert human.returncode == 0, describe(human)
    assert [line.split()[-1] for line in human.stdout.splitlines()] == ["b.txt"]


def test_status_json(config: Path, folder: Path) -> None:
    code, out, _ = sync(config, "photos")
    assert code == 0
    proc, human = parallel(lambda: cli(config, "status", "--json"), lambda: cli(config, "status"))
    assert proc.returncode == 0, describe(proc)
    doc = one_json(proc)
    assert [d["dataset"] for d in doc["datasets"]] == ["photos"]
    st = doc["datasets"][0]
    assert st["driver"] == "local"
    assert st["url"] == folder.resolve().as_uri()
    assert st["sync"] == "poll"
    assert st["interval"] == 1.0
    assert st["items"] == {"live": 5, "tombstone": 0}
    assert st["last_run"]["id"] == out["run"]
    assert st["last_run"]["status"] == "ok"
    assert st["last_run"]["added"] == 5
    assert ISO_UTC.match(st["last_run"]["ended"])
    assert st["next_run"] is None, "no agent runs, so nothing is scheduled"
    assert human.returncode == 0, describe(human)
    assert "photos" in human.stdout and "5 live" in human.stdout


# ---------------------------------------------------------------------- configuration


BAD_CONFIGS = {
    "unknown dataset key": (
        {"local": {"url": "file:///tmp"}},
        {"photos": {"driver": "local", "colour": "blue"}},
        "datasets.photos.colour",
        "unknown field",
    ),
    "bad url": (
        {"local": {"url": "ftp://example.com/x"}},
        {"photos": {"driver": "local"}},
        "drivers.local.url",
        "unsupported URL",
    ),
    "missing driver": (
        {"local": {"url": "file:///tmp"}},
        {"photos": {"driver": "elsewhere"}},
        "datasets.photos.driver",
        "no driver named 'elsewhere'",
    ),
    "bad duration": (
        {"local": {"url": "file:///tmp"}},
        {"photos": {"driver": "local", "interval": "5 parsecs"}},
        "datasets.photos.interval",
        "invalid duration",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_invalid_config_exits_2_naming_the_field(tmp_path: Path, case: str) -> None:
    drivers, datasets, field, message = BAD_CONFIGS[case]
    cfg = write_config(tmp_path, drivers, datasets)
    proc = cli(cfg, "sync", "photos", "--json")
    assert proc.returncode == 2, describe(proc)
    assert f"{field}: " in proc.stderr, describe(proc)
    assert message in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "var").exists(), "a bad config touches no ledger"


def test_invalid_agent_section_names_the_field(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {}, {}, agent={"listen": "no-port-here"})
    proc = cli(cfg, "status")
    assert proc.returncode == 2, describe(proc)
    assert "agent.listen: " in proc.stderr


def test_named_config_that_does_not_exist(tmp_path: Path) -> None:
    proc = cli(tmp_path / "nope.toml", "status")
    assert proc.returncode == 2, describe(proc)
    assert "nope.toml" in proc.stderr and "does not exist" in proc.stderr


def test_config_from_flag_env_and_cwd(tmp_path: Path, folder: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg_a = write_config(tmp_path / "a", {"local": local_driver(folder)}, {"from-env": {"driver": "local"}})
    cfg_b = write_config(tmp_path / "b", {"local": local_driver(folder)}, {"from-flag": {"driver": "local"}})

    # ./bucketsync.toml in the working directory, with a relative folder and ledger
    work = tmp_path / "work"
    write_files(work / "pics", {"one.jpg": "1", "two.jpg": "22", "notes.txt": "n"})
    write_config(
        work,
        {"pics": {"url": "file:pics"}},
        {"pics": {"driver": "pics", "include": ["**/*.jpg"]}},
        agent={"ledger": "var/here.db"},
    )
    env = {"BUCKETSYNC_CONFIG": str(cfg_a)}
    from_env, from_flag, missing, (code, out, proc) = parallel(
        # $BUCKETSYNC_CONFIG, from a folder with no bucketsync.toml
        lambda: status(None, env=env, cwd=tmp_path),
        # -c wins over $BUCKETSYNC_CONFIG
        lambda: status(cfg_b, env=env, cwd=tmp_path),
        # $BUCKETSYNC_CONFIG naming a missing file is an error, even with a ./bucketsync.toml there
        lambda: cli(None, "status", env={"BUCKETSYNC_CONFIG": str(tmp_path / "gone.toml")}, cwd=work),
        lambda: sync(None, "pics", cwd=work),
    )
    assert list(from_env) == ["from-env"]
    assert list(from_flag) == ["from-flag"]
    assert missing.returncode == 2 and "gone.toml" in missing.stderr, describe(missing)
    assert "does not exist" in missing.stderr

    assert code == 0, describe(proc)
    assert (out["added"], out["listed"]) == (2, 2), "include filters to the .jpg files"
    assert (work / "var" / "here.db").exists(), "a relative ledger resolves against the working directory"
    assert [r["key"] for r in items(None, "pics", cwd=work)] == ["one.jpg", "two.jpg"]


def test_env_overrides_the_file(config: Path, folder: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "ledger.db"
    env_ledger = {"BUCKETSYNC_AGENT__LEDGER": str(moved)}
    overridden, bad, (code, out, proc) = parallel(
        lambda: status(config, env={"BUCKETSYNC_DATASETS__PHOTOS__INTERVAL": "7s"}),
        # A bad value from the environment names the field, as one from the file does.
        lambda: cli(config, "status", env={"BUCKETSYNC_DATASETS__PHOTOS__INTERVAL": "soon"}),
        # The ledger can move by env.
        lambda: sync(config, "photos", env=env_ledger),
    )
    assert overridden["photos"]["interval"] == 7.0  # the file says 1s
    assert bad.returncode == 2, describe(bad)
    assert "datasets.photos.interval: " in bad.stderr
    assert code == 0, describe(proc)
    assert moved.exists()
    assert not (tmp_path / "var" / "ledger.db").exists()

    # A guard limit raised by env: 3 of 5 (60%) would abort at the default 0.5.
    for key in ("a.txt", "b.txt", "c.txt"):
        (folder / key).unlink()
    code, out, proc = sync(
        config, "photos", env={**env_ledger, "BUCKETSYNC_DATASETS__PHOTOS__MAX_DELETE_RATIO": "0.75"}
    )
    assert code == 0, describe(proc)
    assert (out["status"], out["removed"]) == ("ok", 3)


# ---------------------------------------------------------------------- check


def test_check_local_folder(config: Path, folder: Path) -> None:
    proc = cli(config, "check", "local", "--json")
    assert proc.returncode == 0, describe(proc)
    out = one_json(proc)
    assert out["driver"] == "local"
    assert out["ok"] is True
    assert set(out["permissions"]) == {"list", "put", "get", "delete"}
    for name in ("list", "put", "get"):
        assert out["permissions"][name] == {"ok": True, "status": "ok", "required": True, "error": None}
    assert out["permissions"]["delete"]["required"] is False, "allow_delete is off by default"
    assert out["permissions"]["delete"]["status"] == "not_required", "delete is not probed without allow_delete"
    # the probe's test-file does not stay behind, and the probe indexes nothing
    leftovers = [p for p in (folder / ".bucketsync").rglob("*") if p.is_file()]
    assert leftovers == []
    assert not ledger_of(config).exists(), "check indexes nothing"


def test_check_missing_folder_names_driver_and_permission(tmp_path: Path) -> None:
    gone = tmp_path / "not-there"
    cfg = write_config(tmp_path, {"gone": local_driver(gone)}, {"photos": {"driver": "gone"}})
    proc, as_json, unknown = parallel(
        lambda: cli(cfg, "check", "gone"),
        lambda: cli(cfg, "check", "gone", "--json"),
        lambda: cli(cfg, "check", "nosuch"),
    )
    assert proc.returncode == 1, describe(proc)
    assert "driver 'gone'" in proc.stderr, describe(proc)
    assert "cannot be synced: list: bucket or folder not found" in proc.stderr, describe(proc)
    assert "lacks permission" not in proc.stdout + proc.stderr, "a missing folder is not a permission problem"
    assert "does not exist" in proc.stdout + proc.stderr
    assert not gone.exists(), "the probe does not create the folder"

    assert as_json.returncode == 1, describe(as_json)
    out = one_json(as_json)
    assert out["ok"] is False
    assert out["permissions"]["list"]["ok"] is False
    assert out["permissions"]["list"]["status"] == "not_found"
    assert out["permissions"]["put"]["status"] == "not_tested", "nothing else is tried on a missing folder"

    assert unknown.returncode == 2, describe(unknown)
    assert "no driver named 'nosuch'" in unknown.stderr and "gone" in unknown.stderr
