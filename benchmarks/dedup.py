"""Benchmark: near-duplicate grouping, the multi-index version against the all-pairs reference, by size.

Random 256-bit hashes (split's width) with a planted share of near duplicates (copies 1 to
max_distance + 2 bits away, so some just over the line) and of exact copies (same sha256).
Times `components.split.group_duplicates` and the quadratic `group_duplicates_all_pairs` in one
run, checks they give the same groups where both run, and prints seconds per size, the ratio at
each shared size, and the growth exponent between sizes (1 = linear, 2 = quadratic).

    .venv/bin/python benchmarks/dedup.py [--sizes 5000 10000 20000 40000 100000 1000000]
                                         [--reference-up-to 40000] [--near 0.1] [--exact 0.05]
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import numpy as np

from components.split import HASH_SIZE, MAX_DISTANCE, group_duplicates, group_duplicates_all_pairs


def planted_hashes(n: int, near: float, exact: float, max_distance: int, seed: int) -> tuple[list[str], list[np.ndarray]]:
    """n rows: sha256 stand-ins and hashes, a share `near` copied from an earlier row with bits flipped, `exact` copied whole."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, np.iinfo(np.uint64).max, size=(n, HASH_SIZE * HASH_SIZE // 64), dtype=np.uint64,
                         endpoint=True)
    sha = np.array([f"{i:x}" for i in range(n)], dtype=object)
    copies = rng.choice(np.arange(1, n), size=int((near + exact) * n), replace=False)
    sources = (rng.random(copies.size) * copies).astype(np.int64)  # an earlier row
    words[copies] = words[sources]
    is_exact = rng.random(copies.size) < exact / (near + exact)
    sha[copies[is_exact]] = sha[sources[is_exact]]
    flips = np.where(is_exact, 0, rng.integers(1, max_distance + 3, size=copies.size))
    bits = words.shape[1] * 64
    for slot in range(max_distance + 2):  # one random bit per copy per slot (a repeat un-flips: a bit closer)
        rows = copies[flips > slot]
        position = rng.integers(0, bits, size=rows.size)
        words[rows, position // 64] ^= np.uint64(1) << (position % 64).astype(np.uint64)
    return sha.tolist(), list(words)


def timed(fn, *args) -> tuple[float, tuple]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def exponent(sizes: list[int], seconds: dict[int, float], n: int) -> str:
    earlier = [m for m in sizes if m < n and m in seconds]
    if not earlier or n not in seconds:
        return "-"
    m = earlier[-1]
    return f"{math.log(seconds[n] / seconds[m]) / math.log(n / m):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000, 40000, 100000, 1000000])
    parser.add_argument("--reference-up-to", type=int, default=40000, help="largest size the all-pairs version runs at")
    parser.add_argument("--near", type=float, default=0.1, help="share of rows that are near copies")
    parser.add_argument("--exact", type=float, default=0.05, help="share of rows that are exact copies")
    parser.add_argument("--max-distance", type=int, default=MAX_DISTANCE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sizes = sorted(args.sizes)
    index_s: dict[int, float] = {}
    reference_s: dict[int, float] = {}
    print(f"hashes: {HASH_SIZE * HASH_SIZE} bits, max distance {args.max_distance}, "
          f"{args.near:.0%} near copies, {args.exact:.0%} exact copies")
    print(f"{'rows':>9} {'index s':>9} {'exp':>5} {'all-pairs s':>12} {'exp':>5} {'ratio':>7} "
          f"{'groups':>9} {'exact':>7} {'near':>7}  same  peak RSS")
    for n in sizes:
        sha, hashes = planted_hashes(n, args.near, args.exact, args.max_distance, args.seed)
        index_s[n], fast = timed(group_duplicates, sha, hashes, args.max_distance)
        reference, same, ratio = "-", "-", "-"
        if n <= args.reference_up_to:
            reference_s[n], slow = timed(group_duplicates_all_pairs, sha, hashes, args.max_distance)
            reference, ratio = f"{reference_s[n]:.2f}", f"{reference_s[n] / index_s[n]:.0f}x"
            same = "yes" if fast == slow else "NO"
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{n:>9} {index_s[n]:>9.3f} {exponent(sizes, index_s, n):>5} {reference:>12} "
              f"{exponent(sizes, reference_s, n):>5} {ratio:>7} {len(set(fast[0])):>9} {fast[1]:>7} {fast[2]:>7}  "
              f"{same:>4}  {rss_mb:.0f} MB", flush=True)
        if same == "NO":
            print("the multi-index groups differ from the all-pairs groups")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
