#!/usr/bin/env python
"""Which content hash for ``verify = "hash"``: throughput and per-file cost of the candidates.

    .venv/bin/pip install -e '.[bench]'        # blake3 is a bench-only dependency
    .venv/bin/python bench/hash_choice.py

Large files: 64 MiB of random bytes fed in 1 MiB chunks, as the local store reads a file
(best of 5). Small files: a one-shot hash of 4 KiB (the per-file overhead that dominates
a folder of small files). Single-threaded unless the name says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import xxhash

try:
    import blake3
except ImportError:  # pragma: no cover - a bench-only dependency
    blake3 = None

CHUNK = 1 << 20


def candidates() -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {
        "xxh3_128 (xxhash)": xxhash.xxh3_128,
        "xxh3_64 (xxhash)": xxhash.xxh3_64,
        "md5 (hashlib)": hashlib.md5,
        "sha256 (hashlib)": hashlib.sha256,
    }
    if blake3 is not None:
        out["blake3"] = blake3.blake3
        out["blake3, all cores"] = lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)
    return out


def main() -> None:
    # No options; --help says what it measures instead of running it.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    data = os.urandom(64 << 20)
    view = memoryview(data)
    small = os.urandom(4096)
    print("| hash | large files, GB/s | 4 KiB file, µs |")
    print("| --- | ---: | ---: |")
    for name, make in candidates().items():
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            h = make()
            for i in range(0, len(data), CHUNK):
                h.update(view[i : i + CHUNK])
            h.hexdigest()
            best = min(best, time.perf_counter() - t0)
        n = 50_000
        t0 = time.perf_counter()
        for _ in range(n):
            h = make()
            h.update(small)
            h.hexdigest()
        per_file = (time.perf_counter() - t0) / n * 1e6
        print(f"| {name} | {len(data) / best / 1e9:.2f} | {per_file:.1f} |")
    if blake3 is None:
        print("\n(blake3 not installed: .venv/bin/pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
