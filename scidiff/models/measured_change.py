"""A measured cell carried to another smooth state: the counterfactual of its measurement.

Pearl's abduction, action and prediction (Pearl 2009, *Causality*, sec. 7.1) through the
detection model (:mod:`scidiff.models.observation`). Each gene of a measured cell is explained by
the cell's smooth expression ``s`` and by the measurement's noise: whether the gene was detected,
and where its level lies among the levels the model gives a detected gene at ``s``. The noise is
kept while the smooth expression moves to ``s' = s + d``, and the measurement is read again:

- the level by the quantile map of changes-in-changes (Athey and Imbens 2006, *Econometrica*
  74:431), ``y = F_s'^-1(F_s(x))``, with ``F`` the detected-level distribution the model reads at
  that smooth value (plus whatever of ``x`` lay beyond the tables' range);
- detection by the monotone coupling of the two draws: a detected gene stays detected with
  probability ``min(1, p'/p)``, an undetected one becomes detected with probability
  ``max(0, (p' - p) / (1 - p))``, ``p`` and ``p'`` the detection probabilities at ``s`` and ``s'``.

With ``d = 0`` every cell comes back as it was; a gene lowered to where the model rarely detects
it is switched off in most cells; a zero stays a zero unless the gene's detection rises. Adding a
change to every value instead would lift every zero of a gene the change raises, and a rank test
(scanpy's Wilcoxon) would call almost every gene of the predicted cells differentially expressed.

The mean a prediction keeps per gene is met by one shift per gene of the detection log-odds
(solved by bisection on the expected mean) and, where detection cannot move it further, a
factor on the detected levels (:func:`fit_mean_keeping`).

The draws are keyed by each cell's row, not by its place in a batch (:func:`cell_uniforms`),
so a prediction does not depend on how the cells are batched.
"""
from __future__ import annotations

import torch

ODDS_BOUND = 20.0  # the log-odds shift is sought in [-ODDS_BOUND, ODDS_BOUND]
_MASK = (1 << 62) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A finaliser after splitmix64's (Steele, Lea and Flood 2014: xor-shift, multiply, twice), on
    non-negative int64 kept in 62 bits (shorter multipliers: torch has no unsigned 64-bit product)."""
    x = x & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB13311) & _MASK
    return x ^ (x >> 31)


def cell_uniforms(seed: int, rows: torch.Tensor, n_genes: int, stream: int) -> torch.Tensor:
    """Uniforms in [0, 1) ``[len(rows), n_genes]``, a function of ``(seed, stream, row, gene)``
    only: counter-based, so a cell draws the same numbers in any batch and on any device."""
    rows = rows.to(torch.int64)
    genes = torch.arange(n_genes, dtype=torch.int64, device=rows.device)
    key = _mix(torch.tensor(((int(seed) & 0xFFFFFFFF) << 8) | (int(stream) & 0xFF), dtype=torch.int64))
    x = _mix(_mix(key.to(rows.device) + rows[:, None] * 0x9E3779B9) + genes[None, :] * 0x632BE5AB)
    return ((x >> 38) & 0xFFFFFF).to(torch.float32) / float(1 << 24)


def _tables(det, smooth: torch.Tensor):
    """Detection probability ``[N, G]`` and detected-level quantiles ``[N, G, Q]`` at ``smooth``,
    read between the flanking bins as the detection model's ``measure`` reads them."""
    k, k1, w = det._between(smooth.float(), det.centres)
    genes = torch.arange(smooth.shape[1], device=smooth.device)[None, :]
    l0 = det.levels[genes, k]
    return det._rate(k, k1, w), l0 + w[..., None] * (det.levels[genes, k1] - l0)


def _position(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``F(x)``: where ``x [N, G]`` lies in the piecewise-linear quantile tables ``levels [N, G, Q]``
    (the inverse of :func:`_level_at`), in [0, 1]."""
    q = levels.shape[-1]
    k = (torch.searchsorted(levels.contiguous(), x[..., None].contiguous(), right=True)[..., 0] - 1).clamp(0, q - 2)
    left = levels.gather(-1, k[..., None])[..., 0]
    right = levels.gather(-1, (k + 1)[..., None])[..., 0]
    frac = torch.where(right > left, ((x - left) / (right - left).clamp_min(1e-12)).clamp(0, 1), (x >= right).float())
    return (torch.where(x < levels[..., 0], torch.zeros_like(frac), k + frac) / (q - 1)).clamp(0, 1)


def _level_at(levels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The level at cumulative probability ``u [N, G]`` of the tables ``levels [N, G, Q]``."""
    q = levels.shape[-1]
    v = u * (q - 1)
    lo = v.floor().long().clamp(0, q - 2)
    left = levels.gather(-1, lo[..., None])[..., 0]
    return left + (v - lo) * (levels.gather(-1, (lo + 1)[..., None])[..., 0] - left)


def _odds(p: torch.Tensor, shift) -> torch.Tensor:
    """``p`` with its log-odds moved by ``shift`` (``p`` kept where the shift is 0)."""
    if shift is None:
        return p
    p = p.clamp(1e-7, 1 - 1e-7)
    return torch.sigmoid(torch.logit(p) + shift)


class Carried:
    """What a batch of measured cells needs to be carried from ``smooth`` to ``moved`` (each
    ``[N, G]``, log1p expression): per value, its detection probabilities before and after, its
    level after if it stays detected, and the mean level of a newly detected one."""

    def __init__(self, det, measured: torch.Tensor, smooth: torch.Tensor, moved: torch.Tensor,
                 level_u: torch.Tensor):
        self.on = measured > 0
        p, before = _tables(det, smooth)
        self.p = p
        self.p_moved, after = _tables(det, moved)
        at = torch.where(self.on, _position(before, measured), level_u)
        beyond = torch.where(self.on, measured - _level_at(before, at), torch.zeros_like(measured))
        self.level = (_level_at(after, at) + beyond).clamp_min(0)
        q = after.shape[-1]  # the mean of a newly detected value's level: its quantile function's (trapezoids)
        self.level_mean = (after.sum(-1) - 0.5 * (after[..., 0] + after[..., -1])) / (q - 1)
        del before, after

    def detected_probability(self, shift=None) -> torch.Tensor:
        """``P(detected after)`` per value, the log-odds of ``p'`` moved by ``shift [G]``."""
        p2 = _odds(self.p_moved, shift)
        keep = torch.where(self.p > 0, (p2 / self.p.clamp_min(1e-12)).clamp_max(1), torch.ones_like(p2))
        gain = torch.where(self.p < 1, ((p2 - self.p) / (1 - self.p).clamp_min(1e-12)).clamp_min(0),
                           torch.zeros_like(p2))
        return torch.where(self.on, keep, gain)

    def expected_mean(self, shift=None) -> torch.Tensor:
        """The carried cells' expected expression per gene ``[G]``."""
        level = torch.where(self.on, self.level, self.level_mean)
        return (self.detected_probability(shift) * level).mean(0)

    def draw(self, detect_u: torch.Tensor, shift=None, factor=None) -> torch.Tensor:
        """The carried measurement ``[N, G]``: detected where ``detect_u`` falls below
        :meth:`detected_probability` (the coupling of the module docstring), at its carried level
        (a newly detected value: the level the caller put in ``level_u``), times ``factor [G]``."""
        level = self.level if factor is None else self.level * factor
        return torch.where(detect_u < self.detected_probability(shift), level, torch.zeros_like(level))


def fit_mean_keeping(carried: Carried, target: torch.Tensor, iterations: int = 40):
    """``(shift [G], factor [G])`` that bring the carried cells' expected mean to ``target [G]``:
    the detection log-odds shift by bisection in ``[-ODDS_BOUND, ODDS_BOUND]`` (the mean rises with
    it), then the detected levels' factor for what detection could not reach (1 where it could;
    1 where no value is detected)."""
    lo = torch.full_like(target, -ODDS_BOUND)
    hi = torch.full_like(target, ODDS_BOUND)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        low = carried.expected_mean(mid) < target
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    shift = (lo + hi) / 2
    reached = carried.expected_mean(shift)
    factor = torch.where(reached > 0, target.clamp_min(0) / reached.clamp_min(1e-12), torch.ones_like(reached))
    return shift, factor
