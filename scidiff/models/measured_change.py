"""A measured cell carried to another smooth state: the counterfactual of its measurement.

Pearl's abduction, action and prediction (Pearl 2009, *Causality*, sec. 7.1) through the
detection model (:mod:`scidiff.models.observation`). Each gene of a measured cell is a draw from
the distribution the model gives a measurement at the cell's smooth expression ``s``: zero with
probability ``1 - p``, else a level from the detected-level quantiles ``F_s``. Its position in that
distribution is abducted, the smooth expression moves to ``s' = s + d``, and the value at the same
position is read: the quantile map of changes-in-changes (Athey and Imbens 2006, *Econometrica*
74:431), ``y = G_s'^-1(G_s(x))``, with ``G`` the whole measured distribution, its atom at zero
included (a zero's position drawn uniformly within the atom, as a randomised probability integral
transform). In terms of ``v = 1 - G_s(x)``, in ``[0, 1]``:

- a detected value has ``v = p (1 - F_s(x))``; it stays detected where ``v <= p'`` (a lowered
  gene switches off first in the cells lowest in its level distribution, on average in a share
  ``1 - p'/p`` of them) at the level of quantile ``1 - v / p'`` (plus whatever of ``x`` lay beyond
  the tables' range);
- a zero has ``v`` drawn in ``(p, 1)``; it is detected where ``v < p'`` (with probability
  ``(p' - p) / (1 - p)`` where detection rises), at a level low in the distribution.

With ``d = 0`` every cell comes back as it was; a zero stays a zero unless the gene's detection
rises. Adding a change to every value instead would lift every zero of a gene the change raises,
and a rank test (scanpy's Wilcoxon) would call almost every gene of the predicted cells
differentially expressed.

The mean a prediction keeps per gene is met by one shift per gene of the moved smooth
expression (bisection on the carried cells' mean: the change the detection model needs to show
that mean); below the lowest mean the tables hold, by a share of the detection kept (the gene
switched off in more cells, as a knockdown does, its detected levels as they are); above the
highest, by a share of the undetected values detected, then a factor on the detected levels
(:func:`fit_mean_keeping`). What lay beyond a cell's tables is carried as it was, up to the larger
of the cell's own value and the highest level the gene's tables hold (before the factor): a value
far above the tables at a low smooth state would otherwise land beyond anything measured.

The zeros' draws are keyed by each cell's row, not by its place in a batch
(:func:`~scidiff.models.cell_draws.cell_uniforms`), and the fitted mean keeping leaves no cell on
a detection threshold (``PAST_THRESHOLD``), so a prediction does not depend on how the cells are
batched.
"""
from __future__ import annotations

import torch

from .observation import level_at as _level_at

TIE = 1e-6  # relative float32 rounding within which two probabilities, or two means, are taken as equal
# a fitted shift (smooth units) or share is stepped this far past where its bisection ends: the mean of
# a few cells rises in steps, so the bisection ends on one cell's detection threshold, where the float
# rounding of the moved expression (a network's output changes with its batch size) would decide it
PAST_THRESHOLD = 1e-4


def _position(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``F(x)``: where ``x [N, G]`` lies in the piecewise-linear quantile tables ``levels [N, G, Q]``
    (the inverse of :func:`~scidiff.models.observation.level_at`), in [0, 1]."""
    q = levels.shape[-1]
    k = (torch.searchsorted(levels.contiguous(), x[..., None].contiguous(), right=True)[..., 0] - 1).clamp(0, q - 2)
    left = levels.gather(-1, k[..., None])[..., 0]
    right = levels.gather(-1, (k + 1)[..., None])[..., 0]
    frac = torch.where(right > left, ((x - left) / (right - left).clamp_min(1e-12)).clamp(0, 1), (x >= right).float())
    return (torch.where(x < levels[..., 0], torch.zeros_like(frac), k + frac) / (q - 1)).clamp(0, 1)


class Carried:
    """A batch of measured cells carried from ``smooth`` to ``moved`` (each ``[N, G]``, log1p
    expression) by the quantile map of each value's whole measured distribution (module
    docstring): per value, its position ``v`` (``p (1 - F_s(x))`` for a detected value, drawn
    from ``offset`` in ``(p, 1)`` for a zero) and what of it lay beyond the tables; the tables
    after are read where the value is carried (:meth:`carry`)."""

    def __init__(self, det, measured: torch.Tensor, smooth: torch.Tensor, moved: torch.Tensor,
                 offset: torch.Tensor):
        self.det, self.moved, self.on = det, moved, measured > 0
        p, before = det.tables(smooth)
        self.at = _position(before, measured)
        self.unknown = self.on & (p <= 0)  # detected where the model says never: its level read as it lies
        self.v = torch.where(self.on, p * (1 - self.at), p + (1 - p) * offset)
        self.beyond = torch.where(self.on, measured - _level_at(before, self.at), torch.zeros_like(measured))
        self.ceiling = torch.maximum(measured, det.levels.amax((1, 2))[None, :])
        del before

    def read(self, shift=None):
        """Where the moved expression plus ``shift [G]`` lies among each gene's bins
        (:meth:`~scidiff.models.observation.DetectionModel._between`) and the detection
        probability there."""
        moved = self.moved if shift is None else self.moved + shift
        between = self.det._between(moved.float(), self.det.centres)
        return between, self.det._rate(*between)

    def carry(self, shift=None, share=None, factor=None, read=None) -> torch.Tensor:
        """The carried measurement ``[N, G]`` at the moved expression plus ``shift [G]`` (smooth
        units; or at ``read``, :meth:`read`'s), with the detection probability ``p`` there moved
        by ``share [G]`` in [0, 2] (``p' = share p`` up to 1, ``p + (share - 1)(1 - p)`` above):
        detected where ``v`` lies within ``p'``, at the level of quantile ``1 - v / p'`` plus what
        lay beyond the tables (at most the cell's ceiling), times ``factor [G]``."""
        between, p2 = read if read is not None else self.read(shift)
        if share is not None:
            p2 = torch.where(share <= 1, p2 * share, p2 + (share - 1) * (1 - p2))
        # a value at the bottom of its level distribution sits at v = p: kept at p' = p up to rounding
        detected = torch.where(self.on, self.v <= p2 * (1 + TIE), self.v < p2) | self.unknown
        u = torch.where(self.unknown, self.at, (1 - self.v / p2.clamp_min(1e-12)).clamp(0, 1))
        level = torch.minimum(self.det.level_between(between, u) + self.beyond, self.ceiling).clamp_min(0)
        if factor is not None:
            level = level * factor
        return torch.where(detected, level, torch.zeros_like(level))

    def mean(self, shift=None, share=None, read=None) -> torch.Tensor:
        """The carried cells' mean expression per gene ``[G]``."""
        return self.carry(shift, share, read=read).mean(0)


def _bisect(mean_at, target: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, iterations: int) -> torch.Tensor:
    """Per gene, the upper end of the bracket ``[lo, hi]`` where ``mean_at`` (rising) meets ``target``."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        low = mean_at(mid) < target
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    return hi


def fit_mean_keeping(carried: Carried, target: torch.Tensor, iterations: int = 30):
    """``(shift [G], share [G], factor [G])`` that bring the carried cells' mean to ``target [G]``:
    a shift of the moved smooth expression per gene, by bisection (the mean rises with it where the
    gene's detection and levels rise with its smooth expression: the change the detection model
    needs to show the target's mean); where even the lowest shift leaves the mean above the target,
    the share of detection kept (fewer cells detected, their levels as they are), and where even
    the highest leaves it below, the share of undetected values detected, by bisection; then the
    detected levels' factor for the rest (near 1 where the shift or share reached the target, the
    mean of a few cells rising in steps of one cell; 1 where no value is detected). The shift and
    share are stepped ``PAST_THRESHOLD`` past where their bisection ends, on a cell's threshold.
    A target met as the cells are keeps no shift."""
    span = carried.det.centres.amax(1) - carried.det.centres.amin(1)
    lowest, highest = -span - 1e-3, span + 1e-3
    met = (carried.mean() - target).abs() <= TIE * target.abs()
    shift = torch.where(met, torch.zeros_like(span), _bisect(carried.mean, target, lowest, highest, iterations)
                        + PAST_THRESHOLD)
    # a step of the mean past the target where the shift meets it is left to the factor
    above = ~met & (carried.mean(lowest) > target * (1 + TIE))
    below = ~met & (carried.mean(highest) < target * (1 - TIE))
    share = torch.ones_like(shift)
    if (above | below).any():
        at = carried.read(shift)
        lo, hi = torch.where(below, share, torch.zeros_like(share)), torch.where(above, share, 2 * share)
        fitted = _bisect(lambda k: carried.mean(share=k, read=at), target, lo, hi, iterations)
        share = torch.where(above | below, (fitted + PAST_THRESHOLD).clamp_max(2), share)
    reached = carried.mean(shift, share)
    factor = torch.where(reached > 0, target.clamp_min(0) / reached.clamp_min(1e-12), torch.ones_like(reached))
    return shift, share, factor
