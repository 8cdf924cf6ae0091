"""The CLI a daily user meets (issue 13.17 and the CLI part of 13.15): real subprocesses,
real ledgers, local folders; one real daemon for the progress line on a real terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pty
import re
import select
import subprocess
from pathlib import Path

import pytest

import bucketsync
from bucketsync.cli.main import build_parser
from e2e import (
    CLI,
    ITEM_KEYS,
    Daemon,
    clean_env,
    cli,
    describe,
    items,
    json_lines,
    local_driver,
    many_files,
    one_json,
    parallel,
    sync,
    write_config,
    write_files,
)

SRC = Path(bucketsync.__file__).resolve().parent
#: what must never reach a terminal raw from a key
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_files(root, {"a.txt": "alpha", "b.txt": "bravo", "sub/c.txt": "charlie"})
    return root


@pytest.fixture
def config(tmp_path: Path, folder: Path) -> Path:
    cfg = write_config(tmp_path, {"local": local_driver(folder)}, {"photos": {"driver": "local"}})
    assert sync(cfg, "photos")[0] == 0
    return cfg


# ---------------------------------------------------------------------- meta


def test_meta_shows_sets_typed_values_and_forces_strings(config: Path) -> None:
    shown = cli(config, "meta", "photos", "a.txt")
    assert shown.returncode == 0, describe(shown)
    assert shown.stdout == "a.txt: no metadata\n"

    out = one_json(
        cli(config, "meta", "photos", "a.txt", "score=0.9", "n=7", "ok=true", "label=cat", 'code="007"', "--json")
    )
    assert out["item"]["metadata"] == {"score": 0.9, "n": 7, "ok": True, "label": "cat", "code": "007"}
    forced = one_json(cli(config, "meta", "photos", "a.txt", "--string", "zip=01234", "v=1.5", "--json"))
    assert forced["item"]["metadata"]["zip"] == "01234" and forced["item"]["metadata"]["v"] == "1.5"
    removed = one_json(cli(config, "meta", "photos", "a.txt", "label=null", "--unset", "n", "--json"))
    assert "label" not in removed["item"]["metadata"] and "n" not in removed["item"]["metadata"]

    human, as_json = parallel(
        lambda: cli(config, "meta", "photos", "a.txt"), lambda: cli(config, "meta", "photos", "a.txt", "--json")
    )
    assert human.returncode == 0, describe(human)
    assert human.stdout.splitlines() == ['code="007"', "ok=true", "score=0.9", 'v="1.5"', 'zip="01234"']
    assert one_json(as_json)["metadata"] == {"code": "007", "ok": True, "score": 0.9, "v": "1.5", "zip": "01234"}

    # the same types as the API: items --json carries them
    rows = {r["key"]: r for r in items(config, "photos")}
    assert rows["a.txt"]["metadata"]["score"] == 0.9

    bad = cli(config, "meta", "photos", "a.txt", "tags=[1,2]")
    assert bad.returncode == 2 and "--string" in bad.stderr, describe(bad)
    missing = cli(config, "meta", "photos", "nope.txt")
    assert missing.returncode == 1 and "nope.txt" in missing.stderr and "Traceback" not in missing.stderr


# ---------------------------------------------------------------------- items


def test_items_state_filter_and_full_json(config: Path, folder: Path) -> None:
    assert cli(config, "rm", "photos", "b.txt").returncode == 0
    live, tomb, every = parallel(
        lambda: items(config, "photos"),
        lambda: items(config, "photos", "--state", "tombstone"),
        lambda: items(config, "photos", "--state", "all"),
    )
    assert [r["key"] for r in live] == ["a.txt", "sub/c.txt"]
    assert [(r["key"], r["state"]) for r in tomb] == [("b.txt", "tombstone")]
    assert [r["key"] for r in every] == ["a.txt", "b.txt", "sub/c.txt"]
    for r in every:
        assert set(r) == ITEM_KEYS
        assert {"metadata", "content_type", "version"} <= set(r)
    human = cli(config, "items", "photos", "--state", "all")
    assert [ln.split()[-2:] for ln in human.stdout.splitlines()] == [
        ["live", "a.txt"],
        ["tombstone", "b.txt"],
        ["live", "sub/c.txt"],
    ]
    bad = cli(config, "items", "photos", "--state", "dead")
    assert bad.returncode == 2 and "--state" in bad.stderr


# ---------------------------------------------------------------------- the parser


def test_config_flag_after_the_subcommand(tmp_path: Path, folder: Path) -> None:
    cfg = write_config(tmp_path, {"local": local_driver(folder)}, {"photos": {"driver": "local"}}, name="other.toml")
    proc = subprocess.run(
        [*CLI, "sync", "photos", "--json", "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)
    assert one_json(proc)["added"] == 3
    after = subprocess.run(
        [*CLI, "items", "photos", "--config", str(cfg)], capture_output=True, text=True, env=clean_env(), check=False
    )
    assert after.returncode == 0 and "a.txt" in after.stdout, describe(after)


def test_every_argument_has_help() -> None:
    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += walk(sub, f"{path} {name}")
                    assert any(c.dest == name and c.help for c in action._choices_actions), f"{path} {name}"
            elif not action.help:
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(build_parser(), "bucketsync") == []


def test_messages_name_real_flags(config: Path, tmp_path: Path) -> None:
    """Advice in a message names the flag a user can type (``--overwrite``), not a bare word."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for word in ("overwrite", "force", "dry_run", "dry-run", "unset", "prefix", "state"):
            assert not re.search(rf"\b(use|with|pass|give|add) {word}\b", text), f"{path}: 'use {word}'"
    local = tmp_path / "x.txt"
    local.write_text("new")
    again = cli(config, "put", "photos", local, "--key", "a.txt")
    assert again.returncode == 1, describe(again)
    assert "--overwrite" in again.stderr, describe(again)


# ---------------------------------------------------------------------- pipes and terminals


def test_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    many_files(folder, 10, 1000, links=True)  # far more output than a pipe buffers
    cfg = write_config(tmp_path, {"m": local_driver(folder)}, {"many": {"driver": "m"}})
    assert sync(cfg, "many")[0] == 0
    for flags in ((), ("--json",)):
        proc = subprocess.Popen(
            [*CLI, "-c", str(cfg), "items", "many", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()  # `| head -1`
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(60)
        assert first.strip(), "it printed a line before the pipe closed"
        assert code in (0, 141), (code, err)
        assert err == "", err


def read_pty(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the slave side closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


@pytest.mark.parametrize("through", ["daemon", "in process"])
def test_tty_progress_is_cleared_before_the_summary(tmp_path: Path, through: str) -> None:
    """``sync`` shows a progress line on a terminal and erases it before the summary, so the
    summary does not end up after the progress text: beside a running agent (polling its API)
    and in process (reading the run's own progress), with the one ``ProgressLine``."""
    folder = tmp_path / "big"
    many_files(folder, 40, 1000, links=True)  # a run long enough for progress polls
    cfg = write_config(tmp_path, {"b": local_driver(folder)}, {"big": {"driver": "b", "sync": "manual"}})
    with contextlib.ExitStack() as stack:
        if through == "daemon":
            stack.enter_context(Daemon(cfg)).wait_ready()
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [*CLI, "-c", str(cfg), "sync", "big"], stdin=slave, stdout=slave, stderr=slave, env=clean_env()
        )
        os.close(slave)
        try:
            text = read_pty(master, proc).decode(errors="replace")
        finally:
            os.close(master)
        assert proc.wait(60) == 0, text
    summary = text.index("big: ok")
    progress = text.rfind("syncing big:", 0, summary)
    assert progress != -1, f"no progress line was shown: {text!r}"
    assert "\r\x1b[K" in text[progress:summary], f"the progress line was not erased: {text!r}"


# ---------------------------------------------------------------------- keys that could forge output


def test_control_characters_in_keys_are_escaped_in_human_and_json_output(tmp_path: Path) -> None:
    keys = {
        "esc\x1b[2J\x1b[31mred": "1",
        "new\nline.txt": "2",
        "tab\there": "3",
        "del\x7fc1\x9bx": "4",
        "bidi\u202eevil.txt": "5",
        "plain é.txt": "6",
    }
    folder = tmp_path / "keys"
    write_files(folder, keys)
    cfg = write_config(tmp_path, {"k": local_driver(folder)}, {"keys": {"driver": "k"}})
    code, out, proc = sync(cfg, "keys")
    assert code == 0 and out["added"] == len(keys), describe(proc)

    human, as_json, status, meta = parallel(
        lambda: cli(cfg, "items", "keys"),
        lambda: cli(cfg, "items", "keys", "--json"),
        lambda: cli(cfg, "status"),
        lambda: cli(cfg, "meta", "keys", "new\nline.txt"),
    )
    for proc in (human, as_json, status, meta):
        assert proc.returncode == 0, describe(proc)
        assert not UNSAFE.search(proc.stdout), f"raw control character in: {proc.stdout!r}"
        assert not UNSAFE.search(proc.stderr), f"raw control character in: {proc.stderr!r}"
    lines = human.stdout.splitlines()
    assert len(lines) == len(keys), "one line per item: no key added a line"
    shown = {ln.split("  ")[-1] for ln in lines}
    assert shown == {
        "$'esc\\e[2J\\e[31mred'",
        "$'new\\nline.txt'",
        "$'tab\\there'",
        "$'del\\x7fc1\\u009bx'",
        "$'bidi\\u202eevil.txt'",
        "plain é.txt",
    }
    rows = json_lines(as_json.stdout)  # valid JSON, one object per line
    assert {r["key"] for r in rows} == set(keys), "the JSON carries the exact keys"
    assert meta.stdout == "$'new\\nline.txt': no metadata\n"
    # bash decodes what was shown back into the key (the $'...' form is pasteable)
    decoded = subprocess.run(
        ["bash", "-c", f"printf %s {shown_of(lines, 'esc')}"], capture_output=True, check=True
    ).stdout
    assert decoded == b"esc\x1b[2J\x1b[31mred"
    assert json.loads(json.dumps(rows)) == rows


def shown_of(lines: list[str], start: str) -> str:
    return next(ln.split("  ")[-1] for ln in lines if ln.split("  ")[-1].startswith(f"$'{start}"))
