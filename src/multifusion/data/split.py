"""Group near-copies and split a labelled image set into train / val / test.

Two micrographs belong to one group when their perceptual hashes differ in at most
``data.near_duplicate_bits`` bits, or when their file names share the first capture
group of ``data.group_pattern`` (e.g. ``r"^(.*)_crop\\d+"`` ties crops of one shot);
groups are closed transitively. A whole group always lands in one split, so no near-copy
of a test image is in train. Groups are assigned per class (stratified), largest first,
each to the split furthest below its target share; seed-deterministic.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache

import numpy as np

from multifusion.data.resample import filter_matrix

SPLITS = ("train", "val", "test")
MIN_GROUPS = 3  # independent groups of a class a split needs before its scores (or a temperature fitted on it) mean much


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n``: (k, n)."""
    freq, pos = np.arange(k)[:, None], np.arange(n)[None, :]
    rows = np.cos(np.pi * (2 * pos + 1) * freq / (2 * n)) * np.sqrt(2.0 / n)
    rows[0] /= np.sqrt(2.0)
    return rows


DCT_8x32 = _dct_rows(32, 8)  # (8, 32)


@lru_cache(maxsize=16)
def _hash_projection(in_size: int) -> np.ndarray:
    """(8, in_size) float32: Pillow's box average to 32 samples, then the 8 lowest DCT rows."""
    return (DCT_8x32 @ filter_matrix(in_size, 32, "box")).astype(np.float32)


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit pHash of a grey image (H, W): signs of the 8x8 lowest DCT frequencies of its
    32x32 box average against their median (DC excluded). Robust to noise, contrast and
    small shifts. Equals ``scipy.fft.dctn(small, norm="ortho")[:8, :8]`` thresholded,
    ``small`` the 32x32 box average, with the average folded into the DCT matrices."""
    rows, cols = _hash_projection(image.shape[0]), _hash_projection(image.shape[1])  # (8, H), (8, W)
    low = (rows @ image.astype(np.float32) @ cols.T).ravel()  # (64,)
    bits = low > np.partition(low[1:], 31)[31]  # the median of the 63 AC terms
    return int(np.packbits(bits).view(">u8")[0])


def near_duplicate_pairs(hashes: np.ndarray, max_bits: int, chunk: int = 2048) -> list[tuple[int, int]]:
    """All pairs (i < j) whose 64-bit hashes differ in at most ``max_bits`` bits.

    hashes: uint64 (N,). Exact all-pairs comparison in row chunks: (chunk, N) at a time.
    """
    pairs: list[tuple[int, int]] = []
    n = len(hashes)
    for start in range(0, n, chunk):
        block = hashes[start:start + chunk, None] ^ hashes[None, :]  # (c, N)
        close = np.bitwise_count(block) <= max_bits
        ii, jj = np.nonzero(close)
        ii = ii + start
        keep = ii < jj
        pairs.extend(zip(ii[keep].tolist(), jj[keep].tolist()))
    return pairs


def pattern_pairs(names: list[str], pattern: str | None) -> list[tuple[int, int]]:
    """Pairs tying each file whose name matches ``pattern`` to the first with the same key.

    The key is the first capture group (or the whole match when there is none)."""
    if not pattern:
        return []
    regex = re.compile(pattern)
    first: dict[str, int] = {}
    pairs = []
    for i, name in enumerate(names):
        match = regex.search(name)
        if match is None:
            continue
        key = match.group(1) if regex.groups else match.group(0)
        if key in first:
            pairs.append((first[key], i))
        else:
            first[key] = i
    return pairs


def union_groups(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Connected components of the pair graph: int64 (n,) group ids 0.. in order of first item."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = [find(i) for i in range(n)]
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(r, len(ids)) for r in roots], dtype=np.int64)


def _assign(group_sizes: dict[int, int], ratios: dict[str, float], rng: np.random.Generator) -> dict[int, str]:
    """Assign the groups of one class to splits: largest first, to the largest deficit."""
    order = list(group_sizes)
    rng.shuffle(order)
    order.sort(key=lambda g: -group_sizes[g])  # stable: shuffled among equal sizes
    total = sum(group_sizes.values())
    priority = [s for s in ("train", "test", "val") if ratios.get(s, 0.0) > 0]
    ratios = {s: ratios[s] / sum(ratios[p] for p in priority) for s in priority}
    filled = {s: 0 for s in priority}
    chosen: dict[int, str] = {}
    for g in order:
        split = max(priority, key=lambda s: (ratios[s] * total - filled[s], -priority.index(s)))
        chosen[g] = split
        filled[split] += group_sizes[g]
    # Every split with a share gets at least one group when there are enough groups:
    # move the smallest train group there.
    for need, min_groups in (("test", 2), ("val", 3)):
        if need in filled and filled[need] == 0 and len(order) >= min_groups:
            train_groups = [g for g in order if chosen[g] == "train"]
            if len(train_groups) > 1:
                g = min(train_groups, key=lambda k: group_sizes[k])
                chosen[g] = need
                filled[need] += group_sizes[g]
                filled["train"] -= group_sizes[g]
    return chosen


def assign_splits(labels: np.ndarray, groups: np.ndarray, ratios: dict[str, float], seed: int,
                  given: list[str | None] | None = None) -> np.ndarray:
    """Split names (N,) for items with ``labels`` (N,) and ``groups`` (N,).

    Stratified by each group's majority label. Items with a ``given`` split keep it (a
    folder layout with train/ val/ test/); when no item is given val, val is carved out
    of the given train items in the ratio val : (train + val)."""
    n = len(labels)
    out = np.empty(n, dtype=object)
    rng = np.random.default_rng(seed)
    if given is not None and any(s is not None for s in given):
        out[:] = [s if s is not None else "train" for s in given]
        if "val" in set(out) or ratios["val"] <= 0:
            return out.astype(str)
        carve = {"train": ratios["train"], "val": ratios["val"]}
        pool = np.nonzero(out == "train")[0]
        ratios_used, items = carve, pool
    else:
        ratios_used, items = dict(ratios), np.arange(n)
    members: dict[int, list[int]] = defaultdict(list)
    for i in items:
        members[int(groups[i])].append(int(i))
    by_class: dict[int, dict[int, int]] = defaultdict(dict)
    for g, idx in members.items():
        majority = int(np.bincount(labels[idx]).argmax())
        by_class[majority][g] = len(idx)
    for label in sorted(by_class):
        for g, split in _assign(by_class[label], ratios_used, rng).items():
            out[members[g]] = split
    return out.astype(str)
