"""Near-duplicate grouping: the multi-index version gives the same groups as comparing all pairs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from components.split import MAX_DISTANCE, group_duplicates, group_duplicates_all_pairs, perceptual_hashes

WORDS = 4  # 256-bit hashes, as split makes them (HASH_SIZE 16: 16 x 16 bits)


def _random(rng: np.random.Generator, n: int, words: int = WORDS) -> np.ndarray:
    return rng.integers(0, np.iinfo(np.uint64).max, size=(n, words), dtype=np.uint64, endpoint=True)


def _flip(h: np.ndarray, positions) -> np.ndarray:
    """A copy of h with the given bit positions flipped (bit p = bit p % 64 of word p // 64)."""
    out = h.copy()
    for p in positions:
        out[p // 64] ^= np.uint64(1) << np.uint64(p % 64)
    return out


def _partition(roots: list[int]) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, r in enumerate(roots):
        groups.setdefault(r, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def _same_as_all_pairs(sha256, hashes, max_distance=MAX_DISTANCE):
    """Both versions' answers, checked equal: same partition, same group ids, same counts."""
    fast = group_duplicates(sha256, hashes, max_distance)
    slow = group_duplicates_all_pairs(sha256, hashes, max_distance)
    assert _partition(fast[0]) == _partition(slow[0])
    assert fast == slow  # group ids are each group's smallest index in both, and the counts agree
    return fast


def _spread(d: int, bits: int = 64 * WORDS) -> list[int]:
    """d bit positions as far apart as possible: each in a different block of the d + 1 blocks
    the index cuts the hash into, the hardest case for it (only one block left unchanged)."""
    return [int(round((i + 0.5) * bits / (d + 1))) for i in range(d)]


@pytest.mark.parametrize("d", [0, 1, 3, MAX_DISTANCE, 20])
def test_distance_boundary(d):
    """Exactly d bits apart joins, d + 1 does not: bits spread over the blocks or packed in one."""
    rng = np.random.default_rng(d)
    bits = 64 * WORDS
    base = _random(rng, 4)
    spread_plus = _spread(d + 1)
    hashes = [
        base[0], _flip(base[0], _spread(d)),  # d apart, one flip in each of d blocks: joins
        base[1], _flip(base[1], spread_plus),  # d + 1 apart, every block changed: stays apart
        base[2], _flip(base[2], range(d)),  # d apart, bits packed together: joins
        base[3], _flip(base[3], range(bits - d - 1, bits)),  # d + 1 apart, packed at the end: apart
    ]
    roots, exact, near = _same_as_all_pairs([f"s{i}" for i in range(8)], hashes, d)
    assert roots[1] == roots[0] and roots[5] == roots[4]
    assert roots[3] != roots[2] and roots[7] != roots[6]
    assert (exact, near) == (0, 2)


def test_chain_joins_transitively():
    """a~b and b~c join a and c though they are farther apart than the distance (union-find)."""
    rng = np.random.default_rng(1)
    a = _random(rng, 1)[0]
    b = _flip(a, range(0, 12, 2))  # 6 bits from a
    c = _flip(b, range(100, 160, 10))  # 6 more: 12 from a
    far = _random(rng, 1)[0]
    roots, exact, near = _same_as_all_pairs(["a", "far", "c", "b"], [a, far, c, b], 10)
    assert roots == [0, 1, 0, 0] and (exact, near) == (0, 2)


def test_exact_duplicates_and_undecodable_rows():
    """Same sha256 joins even where a hash is missing (None: undecodable); same hash joins at distance 0."""
    rng = np.random.default_rng(2)
    h = _random(rng, 3)
    sha = ["x", "y", "x", "z", "w", "y", "v"]
    hashes = [h[0], h[1], None, h[2], h[2], None, None]
    roots, exact, near = _same_as_all_pairs(sha, hashes, 10)
    assert roots == [0, 1, 0, 3, 3, 1, 6]
    assert (exact, near) == (2, 1)
    assert _same_as_all_pairs(["a", "b"], [None, None]) == ([0, 1], 0, 0)
    assert _same_as_all_pairs([], []) == ([], 0, 0)


@pytest.mark.parametrize("words,d", [(WORDS, MAX_DISTANCE), (WORDS, 4), (1, 4), (1, 70), (2, -1)])
def test_random_hashes_with_planted_duplicates(words, d):
    """A few thousand rows: random hashes, copies at 0..d+2 bits, exact copies and undecodable rows."""
    rng = np.random.default_rng(words * 100 + d)
    n, bits = 3000, 64 * words
    hashes = list(_random(rng, n, words))
    sha = [f"s{i}" for i in range(n)]
    for i in rng.choice(np.arange(1, n), size=n // 3, replace=False):
        j = int(rng.integers(0, i))
        if rng.random() < 0.2:
            sha[i], hashes[i] = sha[j], hashes[j]  # an exact copy
        else:
            k = int(rng.integers(0, max(d, 0) + 3))
            hashes[i] = _flip(hashes[j], rng.choice(bits, size=min(k, bits), replace=False))
    for i in rng.choice(n, size=30, replace=False):
        hashes[i] = None
    roots, exact, near = _same_as_all_pairs(sha, hashes, d)
    assert exact > 0 and (near > 0 or d < 0)


def test_crowded_buckets():
    """Many distinct hashes sharing most bits (near-blank slices): large buckets, still the same groups."""
    rng = np.random.default_rng(3)
    n = 2000
    hashes = np.zeros((n, WORDS), dtype=np.uint64)
    hashes[:, 3] = rng.integers(0, 1 << 12, size=n, dtype=np.uint64)  # they differ in 12 bits only
    _same_as_all_pairs([f"s{i}" for i in range(n)], list(hashes), MAX_DISTANCE)


@pytest.mark.realdata
def test_real_sample_same_groups(real_sample_dir):
    """The real sample's perceptual hashes, made as split makes them, group alike at split's distance
    and at wider ones (where real look-alike slices do join, so the index is exercised on real bits)."""
    paths = sorted(str(p) for p in (real_sample_dir / "Dataset").rglob("*") if p.is_file())
    hashes = perceptual_hashes(paths)
    sha = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    assert all(h is not None for h in hashes)
    joined = {d: _same_as_all_pairs(sha, hashes, d)[2] for d in (MAX_DISTANCE, 20, 40, 60)}
    print(f"near-duplicate extras by distance on {len(paths)} real images: {joined}")
    assert joined[60] > joined[MAX_DISTANCE]
