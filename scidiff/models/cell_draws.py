"""Random draws keyed by a cell's row, not by its place in a batch: counter-based (a hash of
``(seed, stream, row, column)``, as Philox and Threefry are; Salmon et al. 2011, SC'11), so a cell
draws the same numbers in any batch, beside any other cells and on any device. A prediction, a
fresh cell or a denoised cell then depends on the cell, its row and the seed only (a cell moved to
another row draws other numbers)."""
from __future__ import annotations

import math

import torch

from ..checks import whole_number

_MASK = (1 << 62) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A finaliser after splitmix64's (Steele, Lea and Flood 2014: xor-shift, multiply, twice), on
    non-negative int64 kept in 62 bits (shorter multipliers: torch has no unsigned 64-bit product)."""
    x = x & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB13311) & _MASK
    return x ^ (x >> 31)


def check_seed(seed) -> int:
    """``seed`` as an int in ``[0, 2**32)`` (what every generator takes; numpy integers and
    integral floats too), else a ValueError naming it: the draws key on 32 bits, so 2**32 would
    draw seed 0's numbers and -1 those of 2**32 - 1."""
    return whole_number("seed", seed, 0, 2**32 - 1, what="an integer in [0, 2**32)")


def cell_uniforms(seed: int, rows: torch.Tensor, n_genes: int, stream: int) -> torch.Tensor:
    """Uniforms in [0, 1) ``[len(rows), n_genes]``, a function of ``(seed, stream, row, gene)``
    only: counter-based, so a cell draws the same numbers in any batch and on any device."""
    seed = check_seed(seed)
    rows = rows.to(torch.int64)
    genes = torch.arange(n_genes, dtype=torch.int64, device=rows.device)
    key = _mix(torch.tensor(((seed & 0xFFFFFFFF) << 8) | (int(stream) & 0xFF), dtype=torch.int64))
    x = _mix(_mix(key.to(rows.device) + rows[:, None] * 0x9E3779B9) + genes[None, :] * 0x632BE5AB)
    return ((x >> 38) & 0xFFFFFF).to(torch.float32) / float(1 << 24)


def cell_normals(seed: int, rows: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """Standard normals ``[len(rows), n]`` keyed as :func:`cell_uniforms` (streams ``stream`` and
    ``stream + 1``), by the Box-Muller transform (Box and Muller 1958, *Ann. Math. Statist.*
    29:610); the 24-bit uniforms bound them within 5.8 standard deviations."""
    radius = torch.sqrt(-2 * torch.log1p(-cell_uniforms(seed, rows, n, stream)))
    return radius * torch.cos(2 * math.pi * cell_uniforms(seed, rows, n, stream + 1))
