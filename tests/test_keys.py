"""Keys: what a user may write or address (check_key), what is an item (indexable), and globs (KeyFilter)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketsync.core.errors import InvalidKey
from bucketsync.core.keys import HIDDEN, KEY_PATTERN, MAX_KEY_BYTES, KeyFilter, check_key, indexable, validate_glob

# ------------------------------------------------------------------ check_key


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "empty"),
        ("..", "'..'"),
        ("../etc/passwd", "'..'"),
        ("a/../b", "'..'"),
        ("a/..", "'..'"),
        (".", "'.'"),
        ("./a", "'.'"),
        ("a/./b", "'.'"),
        ("a//b", "empty"),
        ("/a", "starts with '/'"),
        ("/", "starts with '/'"),
        ("a/", "ends with '/'"),
        ("a/b/", "ends with '/'"),
        ("a\x00b", "NUL"),
        (".bucketsync", "hidden folder"),
        (".bucketsync/thumbs/a.jpg", "hidden folder"),
        (".bucketsync/x", "hidden folder"),
        ("a\ud800b", "not valid UTF-8"),
    ],
)
def test_check_key_rejects(key: str, why: str) -> None:
    with pytest.raises(InvalidKey) as exc:
        check_key(key)
    assert why in str(exc.value)
    assert isinstance(exc.value, ValueError), "InvalidKey is a ValueError (API validation relies on it)"


def test_check_key_rejects_keys_over_1024_bytes() -> None:
    assert check_key("a" * MAX_KEY_BYTES) == "a" * MAX_KEY_BYTES
    with pytest.raises(InvalidKey, match="longer than 1024 bytes"):
        check_key("a" * (MAX_KEY_BYTES + 1))
    # Bytes, not characters: 342 three-byte characters are 1026 bytes.
    assert len("€" * 341) < MAX_KEY_BYTES < len(("€" * 342).encode())
    assert check_key("€" * 341) == "€" * 341
    with pytest.raises(InvalidKey, match="longer than"):
        check_key("€" * 342)


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "photos/2024/IMG 0001.jpg",
        "with space",
        " leading and trailing ",
        "ünïcödé/日本語/файл.txt",
        "emoji/😀.png",
        "e\u0301",  # a combining sequence is just characters
        "a+b=c&d?e#f%20",
        "dots.../x..y/.hidden-file",
        "a/.bucketsync/x",  # only the top-level hidden folder belongs to bucketsync
        ".bucketsyncx",
        "..a/b..",
        # Control characters other than NUL: buckets hold them, sync indexes them, so the API takes them.
        "a\nb",
        "a\tb",
        "esc\x1b[31mred",
        "a\x1fb",
        "a\x7fb",
        "cr\r/lf\n",
    ],
)
def test_check_key_accepts(key: str) -> None:
    assert check_key(key) == key


# ------------------------------------------------------------------ indexable


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("a", True),
        ("a/b.jpg", True),
        ("a/.bucketsync/x", True),
        (".bucketsyncx", True),
        ("", False),
        ("a/", False),
        ("folder/marker/", False),
        (HIDDEN, False),
        (".bucketsync/thumbs/a.jpg", False),
        (".bucketsync/probe", False),
        # Keys the API could not address are not items either: one rule end to end.
        ("a//b", False),
        ("../x", False),
        ("a/./b", False),
        ("/a", False),
        ("a\x00b", False),
        ("k" * (MAX_KEY_BYTES + 1), False),
        (".bucketsync", False),
        ("esc\x1b[0m", True),
        ("line\nbreak", True),
    ],
)
def test_indexable(key: str, expected: bool) -> None:
    assert indexable(key) is expected


# ------------------------------------------------------------------ KeyFilter


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("**/*.jpg", ["a.jpg", "x/a.jpg", "x/y/z/a.jpg"], ["a.png", "a.jpg/x", "x/a.jpgx"]),
        ("*.jpg", ["a.jpg", "x/a.jpg", "x/y/z/a.jpg", ".jpg"], ["a.png", "a.jpg/b", "ajpg"]),
        ("photos/*", ["photos/a", "photos/a.jpg"], ["photos/a/b", "other/photos/a", "photos"]),
        ("photos/**", ["photos/a", "photos/a/b", "photos/a/b/c.jpg"], ["photosx/a", "other/photos/a"]),
        ("**", ["a", "a/b", "a/b/c"], []),
        ("**/raw/**", ["raw/a", "x/raw/a", "x/y/raw/a/b"], ["rawx/a", "x/raw"]),
        ("a/**/b", ["a/b", "a/x/b", "a/x/y/b"], ["a/xb", "b", "x/a/b"]),
        ("[abc].txt", ["a.txt", "b.txt", "d/c.txt"], ["d.txt", "ab.txt"]),
        ("[!abc].txt", ["d.txt", "x/z.txt"], ["a.txt", "c.txt"]),
        ("[a-c]?.txt", ["a1.txt", "cz.txt"], ["d1.txt", "a.txt", "a12.txt"]),
        ("img?.png", ["img1.png", "x/imgA.png"], ["img.png", "img12.png", "img/.png"]),
        ("a+b(c).jpg", ["a+b(c).jpg"], ["aab(c).jpg", "a+bc.jpg"]),
        ("[unclosed", ["[unclosed", "x/[unclosed"], ["u"]),
    ],
)
def test_glob(pattern: str, matching: list[str], not_matching: list[str]) -> None:
    keep = KeyFilter(include=[pattern])
    assert not keep.trivial
    for key in matching:
        assert keep(key), f"{pattern!r} should match {key!r}"
    for key in not_matching:
        assert not keep(key), f"{pattern!r} should not match {key!r}"


def test_empty_filter_keeps_everything() -> None:
    keep = KeyFilter()
    assert keep.trivial
    assert all(keep(k) for k in ["a", "x/y/z.jpg", "weird [chars]"])


def test_several_includes_are_alternatives() -> None:
    keep = KeyFilter(include=["*.jpg", "docs/**"])
    assert keep("a/b.jpg")
    assert keep("docs/x/y.pdf")
    assert not keep("a/b.pdf")


def test_exclude_wins_over_include() -> None:
    keep = KeyFilter(include=["**/*.jpg"], exclude=["private/**", "*.tmp.jpg"])
    assert keep("public/a.jpg")
    assert keep("a.jpg")
    assert not keep("private/a.jpg"), "exclude wins over a matching include"
    assert not keep("private/deep/a.jpg")
    assert not keep("x/y.tmp.jpg")
    assert not keep("public/a.png"), "not included at all"


def test_exclude_only() -> None:
    keep = KeyFilter(exclude=["*.tmp"])
    assert not keep.trivial
    assert keep("a.jpg")
    assert not keep("x/y/a.tmp")


@pytest.mark.parametrize("pattern", ["*.jpg", "**/x", "[abc]", "a/**/b"])
def test_validate_glob_accepts(pattern: str) -> None:
    assert validate_glob(pattern) == pattern


def test_validate_glob_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty glob"):
        validate_glob("")


def test_validate_glob_rejects_uncompilable_class() -> None:
    with pytest.raises(ValueError, match="invalid glob"):
        validate_glob("[z-a]")


# ------------------------------------------------------------------ one rule


@settings(max_examples=500)
@given(st.text(alphabet=st.sampled_from(["a", ".", "/", "\n", "\x1b", "\x00", "é", "b"]), max_size=12))
def test_indexable_check_key_and_the_documented_pattern_agree(key: str) -> None:
    """Every key sync can index is a key the API accepts, and the OpenAPI pattern says the same."""
    try:
        check_key(key)
        accepted = True
    except InvalidKey:
        accepted = False
    assert indexable(key) is accepted
    assert (re.match(KEY_PATTERN, key) is not None) is accepted, key
