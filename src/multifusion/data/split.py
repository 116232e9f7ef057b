"""Group near-copies and split a labelled image set into train / val / test.

Two micrographs belong to one group when their perceptual hashes differ in at most
``data.near_duplicate_bits`` bits, or when their file names share the first capture
group of ``data.group_pattern`` (e.g. ``r"^(.*)_crop\\d+"`` ties crops of one shot);
groups are closed transitively. A whole group always lands in one split, so no near-copy
of a test image is in train. Groups are assigned per class (stratified), largest first,
each to the split furthest below its target share; seed-deterministic. ``SPLITS`` names
the splits for the whole package.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

SPLITS = ("train", "val", "test")
MIN_GROUPS = 3  # independent groups of a class a split needs before its scores (or a temperature fitted on it) mean much


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


def connected_groups(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Connected components of the undirected graph on items 0..n-1 whose edges are
    ``pairs``: int64 (n,) group ids 0.., numbered in order of each group's first item."""
    edges = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)  # (E, 2)
    graph = coo_array((np.ones(len(edges), bool), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)  # (n,) in scipy's own numbering
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # scipy's component -> its rank by first item
    return rank[inverse].astype(np.int64)


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
