"""The distinct rows of a cells x columns table (multi-hot perturbation codes beside context codes)
and each cell's row: ``np.unique(axis=0)`` without its lexicographic sort of every cell's row,
which took minutes on a screen of 100,000 cells and 1,000 perturbations."""
from __future__ import annotations

import numpy as np

CHUNK = 65_536  # cells hashed and checked at a time (bounds the float64 copies)


def unique_rows(*blocks: np.ndarray):
    """The distinct rows of the columns of ``blocks`` (2-D arrays with the same number of rows,
    side by side), as ``np.unique(np.hstack(blocks), axis=0, return_inverse=True,
    return_counts=True)`` gives them: the distinct rows in lexicographic order (one array per
    block, in the block's dtype), each row's index into them ``[N]`` and their counts ``[M]``.

    Each row is hashed by a fixed random projection (one matrix-vector product per block, in
    chunks of cells), the cells are grouped by hash, and the grouping is then checked exactly:
    every cell equals its group's first cell and no two groups are equal. Where a check fails
    (two different rows with the same float hash, or rounding that splits equal rows), the
    answer comes from ``np.unique`` itself, so it is exact either way."""
    blocks = [np.asarray(b) for b in blocks]
    n = len(blocks[0])
    if any(b.ndim != 2 or len(b) != n for b in blocks):
        raise ValueError("unique_rows takes 2-D blocks with the same number of rows")
    width = sum(b.shape[1] for b in blocks)
    if n == 0 or width == 0:
        return _exact(blocks)
    rng = np.random.default_rng(0)
    weights = [rng.uniform(1.0, 2.0, b.shape[1]) for b in blocks]
    hashes = np.zeros(n)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        for b, w in zip(blocks, weights):
            hashes[start:stop] += np.asarray(b[start:stop], np.float64) @ w
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    reps = [b[first] for b in blocks]
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        for b, rep in zip(blocks, reps):
            if not np.array_equal(rep[inverse[start:stop]], b[start:stop]):
                return _exact(blocks)
    table = np.hstack([np.asarray(r, np.float64) for r in reps])
    order = np.lexsort(table.T[::-1])
    table = table[order]
    if len(table) > 1 and (table[1:] == table[:-1]).all(1).any():
        return _exact(blocks)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    inverse = rank[inverse]
    return [r[order] for r in reps], inverse, np.bincount(inverse, minlength=len(order))


def _exact(blocks):
    """``unique_rows`` by ``np.unique(axis=0)`` on the stacked blocks (float64 where they differ)."""
    dtype = np.result_type(*blocks) if len({b.dtype for b in blocks}) > 1 else blocks[0].dtype
    table = np.hstack([np.asarray(b, dtype) for b in blocks]) if len(blocks) > 1 else blocks[0]
    rows, inverse, counts = np.unique(table, axis=0, return_inverse=True, return_counts=True)
    edges = np.cumsum([0] + [b.shape[1] for b in blocks])
    return ([rows[:, a:z].astype(b.dtype) for a, z, b in zip(edges[:-1], edges[1:], blocks)],
            inverse.reshape(-1), counts)
