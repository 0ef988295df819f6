"""Split: stratified train/val/test where duplicates never cross splits.

`split(data, out)` reads `{data}/manifest.csv` and writes `{out}/train.csv`, `val.csv`,
`test.csv` (the manifest columns plus `group`) and `{out}/split_report.json`.

Duplicates leak a test set into training (the seed project leaked 122 test images), so
images are first grouped: exact duplicates share a sha256, near duplicates (a re-encoded,
resized or slightly brightened copy) have perceptual hashes within a small Hamming distance.
Groups are joined with union-find, and whole groups are assigned to splits, class by class,
so each split keeps the class proportions. Undecodable rows are never split.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from brainscan import storage
from brainscan.config import DEFAULTS, IO_WORKERS, TEST_FRACTION, VAL_FRACTION
from brainscan.dataset import SPLITS, read_manifest
from brainscan.labels import CLASSES

log = logging.getLogger(__name__)

# 256-bit perceptual hashes: on the phantoms and the real sample, re-encoded / resized /
# brightened copies stay within 6 bits while unrelated slices sit 20+ bits apart (with
# 64-bit hashes unrelated look-alike slices came within 4 bits: too many false joins).
HASH_SIZE = 16
MAX_DISTANCE = 10


@dataclass
class SplitResult:
    out: str
    counts: dict[str, int]  # images per split
    per_class: dict[str, dict[str, int]]  # split -> class -> images
    groups: int  # groups (an image without duplicates is a group of one)
    duplicate_groups: int  # groups of more than one image
    exact_duplicates: int  # extra copies with the same sha256
    near_duplicates: int  # extra images joined by perceptual hash only
    excluded: list[str]  # undecodable rows, never split
    cross_split_duplicates: int  # always 0; checked after assignment
    mixed_class_groups: int  # duplicate groups whose images carry different labels (a labelling problem)
    report_uri: str

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "excluded"} | {"excluded": len(self.excluded)}


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _phash(uri: str) -> np.ndarray | None:
    """The perceptual hash of a stored image as packed uint64 words (None if it does not decode)."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
            bits = imagehash.phash(image.convert("L"), hash_size=HASH_SIZE).hash.flatten()
            return np.packbits(bits).view(np.uint64)
    except Exception as err:
        log.warning("split: cannot hash %s: %s", uri, err)
        return None


def perceptual_hashes(paths: list[str], workers: int = IO_WORKERS) -> list[np.ndarray | None]:
    """Hashes of many stored images, read in parallel (S3 reads are I/O-bound)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(_phash, paths), total=len(paths), desc="perceptual hashes",
                         unit="img", disable=len(paths) < 50, mininterval=2))


def _join(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Join edges a[i]-b[i] into `labels` (each node's label: its component's smallest index, as
    _UnionFind's roots are). `labels` must come from np.arange or an earlier _join."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while a.size:
        la, lb = labels[a], labels[b]
        differ = la != lb
        # labels are fully compressed here (every label is a root), so an edge whose ends agree stays agreed
        a, b, la, lb = a[differ], b[differ], la[differ], lb[differ]
        if not a.size:
            break
        np.minimum.at(labels, np.maximum(la, lb), np.minimum(la, lb))  # hook the larger root under the smaller
        while True:  # pointer jumping until every node points at its root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
    return labels


def _block_keys(words: np.ndarray, start: int, stop: int) -> list[np.ndarray]:
    """Bits [start, stop) of each row (bit p = bit p % 64 of word p // 64), packed into as few uint64 columns as fit."""
    columns, value, width = [], None, 0
    for w in range(start // 64, (stop - 1) // 64 + 1):
        lo, hi = max(start, 64 * w) - 64 * w, min(stop, 64 * (w + 1)) - 64 * w
        bits = hi - lo
        part = words[:, w] >> np.uint64(lo)
        if bits < 64:
            part = part & np.uint64((1 << bits) - 1)
        if value is not None and width + bits > 64:
            columns.append(value)
            value, width = None, 0
        value = part if value is None else value | (part << np.uint64(width))
        width += bits
    columns.append(value)
    return columns


_PAIR_CHUNK = 1 << 20  # candidate pairs checked at a time: bounds memory however large a bucket is


def _candidates(words: np.ndarray, max_distance: int):
    """Chunks (left, right) of row pairs of `words` that agree exactly on one of max_distance + 1 blocks.

    Multi-index hashing, by the pigeonhole principle: split the B bits into max_distance + 1 disjoint
    blocks; two hashes at most max_distance bits apart agree exactly on at least one block. So every
    near pair is among these candidates (found by sorting each block's values), and a check of the
    full distance keeps exactly the pairs that comparing all with all would keep.
    """
    m, bits = words.shape[0], words.shape[1] * 64
    edges = np.linspace(0, bits, min(max_distance + 1, bits) + 1).round().astype(int)
    for start, stop in zip(edges[:-1], edges[1:]):
        keys = _block_keys(words, int(start), int(stop))
        order = np.lexsort(keys[::-1])
        sorted_keys = [k[order] for k in keys]
        new_run = np.ones(m, dtype=bool)
        new_run[1:] = np.logical_or.reduce([k[1:] != k[:-1] for k in sorted_keys])
        run_start = np.flatnonzero(new_run)
        run_end = np.append(run_start[1:], m)
        # position p in the sorted order pairs with every later position of its run
        later = np.repeat(run_end, run_end - run_start) - 1 - np.arange(m)
        cum = np.cumsum(later)
        for first in range(0, int(cum[-1]), _PAIR_CHUNK):
            t = np.arange(first, min(first + _PAIR_CHUNK, int(cum[-1])), dtype=np.int64)
            p = np.searchsorted(cum, t, side="right")
            yield order[p], order[p + 1 + (t - (cum[p] - later[p]))]


def _near_groups(words: np.ndarray, max_distance: int) -> np.ndarray:
    """Labels (smallest row of each group) of distinct hashes joined when within max_distance bits.

    Cost: a sort per block (m log m) plus one check per candidate pair. Random-looking 256-bit hashes
    in 11 blocks of ~23 bits make few candidates (about m^2 / 2^24 per block); on the real sample 52
    of its 237,705 pairs were candidates farther than 10 bits (2e-4: ~1e8 checks at 1M such hashes,
    seconds). Worst case: many distinct hashes sharing a block value (near-blank slices differing in
    a few bits) fill one bucket, and a bucket of s hashes costs s^2 / 2 checks: quadratic in the
    largest such bucket, though pairs already in one group are skipped and memory stays
    O(m + _PAIR_CHUNK).
    """
    m = words.shape[0]
    labels = np.arange(m, dtype=np.int64)
    if m < 2 or max_distance < 0:
        return labels
    if max_distance >= words.shape[1] * 64:  # every pair is within the distance
        return np.zeros(m, dtype=np.int64)
    for left, right in _candidates(words, max_distance):
        todo = labels[left] != labels[right]  # already one group: nothing to learn from this pair
        left, right = left[todo], right[todo]
        near = np.bitwise_count(words[left] ^ words[right]).sum(axis=1) <= max_distance
        labels = _join(labels, left[near], right[near])
    return labels


def group_duplicates(sha256: list[str], hashes: list[np.ndarray | None],
                     max_distance: int = MAX_DISTANCE) -> tuple[list[int], int, int]:
    """Group ids (the index of each group's first row; union of exact and near duplicates);
    (groups, exact extras, near-only extras). Near-linear: see _near_groups."""
    n = len(sha256)
    if n == 0:
        return [], 0, 0
    codes, digests = pd.factorize(pd.Series(sha256))
    first_row = np.empty(len(digests), dtype=np.int64)
    first_row[codes[::-1]] = np.arange(n - 1, -1, -1)  # the smallest index wins: written last
    labels = _join(np.arange(n, dtype=np.int64), np.arange(n), first_row[codes])
    exact_groups = len(digests)
    have = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    if have.size and max_distance >= 0:  # below 0 not even identical hashes are near
        words = np.stack([hashes[i] for i in have])
        # identical hashes (exact copies, re-encodes that hash the same, blank slices) are one
        # row of the index, so each bucket holds distinct hashes only
        distinct, first, inverse = np.unique(words, axis=0, return_index=True, return_inverse=True)
        near = _near_groups(distinct, max_distance)
        labels = _join(labels, have, have[first[near[inverse.reshape(-1)]]])
    near_extra = exact_groups - len(np.unique(labels))
    return labels.tolist(), n - exact_groups, near_extra


def group_duplicates_all_pairs(sha256: list[str], hashes: list[np.ndarray | None],
                               max_distance: int = MAX_DISTANCE) -> tuple[list[int], int, int]:
    """The quadratic reference group_duplicates must equal (all pairs, XOR + popcount row by row).
    Split never calls it: it is kept for the equivalence tests and benchmarks/dedup.py."""
    n = len(sha256)
    uf = _UnionFind(n)
    first_of: dict[str, int] = {}
    for i, digest in enumerate(sha256):
        if digest in first_of:
            uf.union(first_of[digest], i)
        else:
            first_of[digest] = i
    exact_roots = [uf.find(i) for i in range(n)]
    exact_extra = n - len(set(exact_roots))
    # near duplicates: every pair within max_distance bits, XOR + popcount row by row (quadratic)
    have = [i for i, h in enumerate(hashes) if h is not None]
    if have:
        words = np.stack([hashes[i] for i in have])
        for row, i in enumerate(have):
            distances = np.bitwise_count(words[row + 1:] ^ words[row]).sum(axis=1)
            for offset in np.nonzero(distances <= max_distance)[0]:
                uf.union(i, have[row + 1 + offset])
    roots = [uf.find(i) for i in range(n)]
    near_extra = len(set(exact_roots)) - len(set(roots))
    # stable group ids: the index of the group's first row
    return roots, exact_extra, near_extra


def _assign(df: pd.DataFrame, val: float, test: float, seed: int) -> dict[int, str]:
    """Group -> split. Groups are stratified by their (majority) class and shuffled with the seed."""
    rng = np.random.default_rng(seed)
    group_class = df.groupby("group")["class7"].agg(lambda s: s.value_counts().index[0])
    group_size = df.groupby("group").size()
    assignment: dict[int, str] = {}
    for class7 in sorted(group_class.unique()):
        groups = sorted(group_class.index[group_class == class7])
        groups = [groups[i] for i in rng.permutation(len(groups))]
        total = int(group_size[groups].sum())
        target = {"test": test * total, "val": val * total}
        filled = {"test": 0, "val": 0}
        # Fill test, then val, with whole groups up to their share; the rest trains.
        # A group that would overshoot its split's share by more than half goes on to the next split.
        for g in groups:
            size = int(group_size[g])
            for name in ("test", "val"):
                if filled[name] + size <= target[name] + 0.5 * max(size, 1) and filled[name] < target[name]:
                    assignment[g] = name
                    filled[name] += size
                    break
            else:
                assignment[g] = "train"
    return assignment


def split(data: str, out: str, val: float = VAL_FRACTION, test: float = TEST_FRACTION, seed: int = DEFAULTS.seed,
          max_distance: int = MAX_DISTANCE, workers: int = IO_WORKERS, once: bool = False) -> SplitResult:
    """Split `{data}/manifest.csv` into `{out}/{train,val,test}.csv` with duplicates kept together.

    once: `out` is write-once (under a data version, brainscan.layout): a file already there with the
    same bytes is kept, one with other bytes is never replaced (storage.ImmutableObjectError).
    """
    write = storage.write_once if once else storage.write_bytes
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val ({val}) and test ({test}) must be fractions in [0, 1) with val + test < 1")
    manifest_uri = storage.join(data, "manifest.csv")
    manifest = read_manifest(data, required=("path", "sha256", "class7", "decodable"))
    unknown = sorted(set(manifest["class7"].dropna()) - set(CLASSES))
    if unknown:
        raise ValueError(f"{manifest_uri} has unknown class(es) {unknown}; run `brainscan validate` first")

    decodable = manifest["decodable"].astype(str).str.strip().str.lower().isin(["true", "1"])
    hashes = perceptual_hashes(manifest["path"].tolist(), workers=workers)
    # a row the manifest calls decodable but that does not decode now is excluded too
    usable = decodable & pd.Series([h is not None for h in hashes], index=manifest.index)
    excluded = manifest.loc[~usable, "path"].tolist()
    if excluded:
        log.warning("split: %d undecodable file(s) left out of every split: %s", len(excluded), excluded[:5])
    df = manifest[usable].reset_index(drop=True)
    kept_hashes = [h for h, ok in zip(hashes, usable) if ok]
    if df.empty:
        raise ValueError(f"{manifest_uri}: no decodable images to split")

    roots, exact_extra, near_extra = group_duplicates(df["sha256"].tolist(), kept_hashes, max_distance)
    df["group"] = roots
    mixed = df.groupby("group")["class7"].nunique()
    if (mixed > 1).any():
        # kept together anyway (a leak is worse); stratified by the group's majority class
        log.warning("split: %d duplicate group(s) hold images of more than one class", int((mixed > 1).sum()))
    assignment = _assign(df, val, test, seed)
    df["split"] = df["group"].map(assignment)

    # The promise of this step, checked rather than assumed.
    splits_per_sha = df.groupby("sha256")["split"].nunique()
    splits_per_group = df.groupby("group")["split"].nunique()
    cross = int((splits_per_sha > 1).sum() + (splits_per_group > 1).sum())
    if cross:
        raise RuntimeError(f"internal error: {cross} duplicate group(s) span splits")

    columns = list(manifest.columns) + ["group"]
    counts, per_class = {}, {}
    for name in SPLITS:
        part = df[df["split"] == name].sort_values("path")[columns]
        write(storage.join(out, f"{name}.csv"), part.to_csv(index=False).encode(), "text/csv")
        counts[name] = len(part)
        per_class[name] = {c: int(n) for c, n in sorted(Counter(part["class7"]).items())}

    sizes = df.groupby("group").size()
    duplicate_groups = [sorted(g["path"].tolist()) for _, g in df.groupby("group") if len(g) > 1]
    report_uri = storage.join(out, "split_report.json")
    mixed_groups = [sorted(f"{p} ({c})" for p, c in zip(g["path"], g["class7"]))
                    for _, g in df.groupby("group") if g["class7"].nunique() > 1]
    result = SplitResult(out, counts, per_class, int(len(sizes)), len(duplicate_groups), exact_extra,
                         near_extra, excluded, 0, len(mixed_groups), report_uri)
    write(report_uri, storage.json_bytes({
        "manifest": manifest_uri,
        "seed": seed, "val": val, "test": test, "max_hamming_distance": max_distance,
        **result.summary(),
        "excluded": excluded,
        "duplicate_group_members": duplicate_groups,
        "mixed_class_group_members": mixed_groups,
    }), "application/json")
    log.info("split: %s", counts)
    return result

