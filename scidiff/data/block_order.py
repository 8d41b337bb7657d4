"""Which cells each streaming batch holds: block-shuffled, sharded, reproducible.

The cells (a sorted set of runs of cell ids) are cut into contiguous blocks. Each epoch the
blocks are permuted (the same permutation on every rank: it depends on ``seed`` and ``epoch``
only), the resulting sequence is cut into ``world_size`` contiguous shards (disjoint, covering,
sizes differing by at most one cell), and each shard is read in fetch groups of several batches:
a group's cells are read together, in file order, then shuffled in memory and split into
batches. Every cell is visited exactly once per epoch across all ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def as_runs(cells) -> np.ndarray:
    """Sorted, distinct cell ids (or ``[k, 2]`` runs) -> ``[k, 2]`` int64 runs ``[start, stop)``."""
    a = np.asarray(cells, dtype=np.int64)
    if a.ndim == 2:
        return a.reshape(-1, 2)
    if a.size == 0:
        return np.zeros((0, 2), np.int64)
    if (np.diff(a) <= 0).any():
        raise ValueError("cell ids must be sorted and distinct")
    breaks = np.flatnonzero(np.diff(a) != 1) + 1
    starts = a[np.r_[0, breaks]]
    stops = a[np.r_[breaks - 1, a.size - 1]] + 1
    return np.stack([starts, stops], 1)


def runs_to_ids(runs: np.ndarray) -> np.ndarray:
    """``[k, 2]`` runs -> the cell ids they hold, in order."""
    if len(runs) == 0:
        return np.zeros(0, np.int64)
    lengths = runs[:, 1] - runs[:, 0]
    offsets = np.repeat(runs[:, 0] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + offsets


@dataclass
class Group:
    """One fetch group: ``runs`` to read (file order, merged), and ``batches``: for each batch the
    positions of its cells among the group's cells (the runs' cells concatenated)."""

    runs: np.ndarray
    batches: list[np.ndarray]

    @property
    def cell_ids(self) -> np.ndarray:
        return runs_to_ids(self.runs)


class BlockOrder:
    """The epoch plan for the cells in ``runs`` (see the module docstring)."""

    def __init__(self, runs, *, batch_size: int, block_size: int = 64, fetch_batches: int = 8,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or block_size < 1 or fetch_batches < 1:
            raise ValueError("batch_size, block_size and fetch_batches must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}")
        self.runs = as_runs(runs)
        lengths = self.runs[:, 1] - self.runs[:, 0]
        if (lengths < 0).any():
            raise ValueError("runs must have start <= stop")
        self._cum = np.r_[0, np.cumsum(lengths)]  # position of each run's first cell
        self.n_cells = int(self._cum[-1])
        self.batch_size, self.block_size, self.fetch_batches = batch_size, block_size, fetch_batches
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size

    # -- sizes ------------------------------------------------------------------------------------
    def shard_bounds(self, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        return r * self.n_cells // self.world_size, (r + 1) * self.n_cells // self.world_size

    def shard_cells(self) -> int:
        lo, hi = self.shard_bounds()
        n = hi - lo
        return n - n % self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        return -(-self.shard_cells() // self.batch_size)

    # -- the plan ---------------------------------------------------------------------------------
    def _block_sequence(self, epoch: int) -> np.ndarray:
        """``[n_blocks, 2]`` position ranges in this epoch's order."""
        starts = np.arange(0, self.n_cells, self.block_size, dtype=np.int64)
        blocks = np.stack([starts, np.minimum(starts + self.block_size, self.n_cells)], 1)
        if self.shuffle and len(blocks):
            blocks = blocks[np.random.default_rng([self.seed, epoch]).permutation(len(blocks))]
        return blocks

    def _positions_to_runs(self, pos: np.ndarray) -> np.ndarray:
        """Position ranges ``[m, 2]`` -> cell-id runs, sorted and merged."""
        out = []
        for a, b in pos:
            k = int(np.searchsorted(self._cum, a, side="right")) - 1
            while a < b:
                stop = min(b, int(self._cum[k + 1]))
                first = int(self.runs[k, 0] + (a - self._cum[k]))
                out.append((first, first + stop - a))
                a, k = stop, k + 1
        if not out:
            return np.zeros((0, 2), np.int64)
        runs = np.asarray(sorted(out), dtype=np.int64)
        merged = [list(runs[0])]
        for s, e in runs[1:]:
            if s == merged[-1][1]:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        return np.asarray(merged, dtype=np.int64)

    def groups(self, epoch: int = 0):
        """Yield this rank's :class:`Group` objects for ``epoch``, in order."""
        lo, _ = self.shard_bounds()
        hi = lo + self.shard_cells()
        seq = self._block_sequence(epoch)
        lengths = seq[:, 1] - seq[:, 0]
        seq_cum = np.r_[0, np.cumsum(lengths)]
        group_cells = self.batch_size * self.fetch_batches
        for g, g_lo in enumerate(range(lo, hi, group_cells)):
            g_hi = min(hi, g_lo + group_cells)
            first = int(np.searchsorted(seq_cum, g_lo, side="right")) - 1
            last = int(np.searchsorted(seq_cum, g_hi, side="left"))
            pos = seq[first:last].copy()
            pos[0, 0] += g_lo - seq_cum[first]
            pos[-1, 1] -= seq_cum[last] - g_hi
            runs = self._positions_to_runs(pos)
            n = g_hi - g_lo
            order = (np.random.default_rng([self.seed, epoch, self.rank, g]).permutation(n) if self.shuffle
                     else np.arange(n, dtype=np.int64))
            yield Group(runs, [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)])

    def split(self, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Split the cells into ``(train_runs, val_runs)`` by whole blocks, about ``val_fraction``
        of the blocks (at least one when there are two or more) going to validation, never all of
        them (one block: all cells train)."""
        starts = np.arange(0, self.n_cells, self.block_size, dtype=np.int64)
        blocks = np.stack([starts, np.minimum(starts + self.block_size, self.n_cells)], 1)
        n_val = min(int(round(len(blocks) * val_fraction)), max(len(blocks) - 1, 0))
        if val_fraction > 0 and len(blocks) >= 2:
            n_val = max(n_val, 1)
        pick = np.zeros(len(blocks), bool)
        pick[np.random.default_rng(seed).choice(len(blocks), n_val, replace=False)] = True
        return self._positions_to_runs(blocks[~pick]), self._positions_to_runs(blocks[pick])
