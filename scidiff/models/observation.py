"""What a measurement of a cell looks like, given the smooth expression the model generates.

A model that diffuses in principal axes generates each cell's *smooth* expression: its
projection on the leading axes, where almost every gene is a small positive number. A measured
scRNA-seq profile is sparse (95% zeros in Kang's PBMCs) because each gene is either detected, at
a level set by its counts, or not. :class:`DetectionModel` maps one to the other, per gene, as a
hurdle model (a detection probability and a distribution of detected levels) estimated on the
training cells, where both the smooth expression (the cell's own projection) and the
measurement are known:

- the smooth values of each gene are cut into quantile bins, about ``CELLS_PER_BIN`` (100)
  training cells each, 4 to ``bins`` (16) of them: a bin's detection rate and detected levels
  are read from enough cells (pbmc68k_reduced's 560 training cells: 6 bins; Kang's 1,580: 16);
- in each bin, the fraction of cells in which the gene is detected (non-zero), and the
  ``quantiles`` quantiles of its detected levels.

Sampling a measurement draws, per gene, detection with the bin's probability and a detected level
by inverse-CDF interpolation between the bin's quantiles. This is the empirical analogue of a
zero-inflated observation model (as scVI's ZINB likelihood, Lopez et al. 2018), with no
parametric form to misfit: a cell's measured profile comes back with the data's sparsity and
detected levels, while its smooth state keeps the model's biology.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.dispatch import kernel_mode

try:  # the compiled measurement (csrc/measure.cpp); absent when the package was installed without building it
    from . import _measure as _native
except ImportError:  # pragma: no cover - exercised by installs without a compiler
    _native = None

CELLS_PER_BIN = 100  # training cells a bin of smooth values is read from, about
MIN_BINS = 4


class DetectionModel(nn.Module):
    """Per-gene detection probability and detected-level quantiles, binned on smooth expression.

    Buffers: ``edges [G, bins + 1]`` (bin edges of the smooth values), ``detection [G, bins]``
    and ``levels [G, bins, quantiles]``; ``fitted`` says whether :meth:`fit` has run. ``bins``
    is the most bins :meth:`fit` uses (it sizes the tables to the cells it is given).
    """

    def __init__(self, n_genes: int, bins: int = 16, quantiles: int = 32):
        super().__init__()
        self.max_bins, self.quantiles = int(bins), int(quantiles)
        self._size(n_genes, self.max_bins, torch.device("cpu"))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _size(self, n_genes: int, bins: int, device) -> None:
        """(Re)allocate the tables for ``bins`` bins."""
        self.bins = int(bins)
        self.register_buffer("edges", torch.zeros(n_genes, self.bins + 1, device=device))
        self.register_buffer("detection", torch.zeros(n_genes, self.bins, device=device))
        self.register_buffer("levels", torch.zeros(n_genes, self.bins, self.quantiles, device=device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "detection")
        if saved is not None and saved.ndim == 2 and saved.shape[1] != self.bins:  # fitted on fewer cells
            self._size(self.edges.shape[0], saved.shape[1], self.edges.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def bins_for(n_cells: int, most: int = 16) -> int:
        """Bins for ``n_cells`` training cells: about ``CELLS_PER_BIN`` each, ``MIN_BINS`` to ``most``."""
        return int(min(most, max(MIN_BINS, round(n_cells / CELLS_PER_BIN))))

    def _bin(self, smooth: torch.Tensor) -> torch.Tensor:
        """Bin index ``[G, N]`` of each value of ``smooth [N, G]`` (values outside the training
        range fall in the first or last bin)."""
        inner = self.edges[:, 1:-1].contiguous()
        return torch.searchsorted(inner, smooth.T.contiguous(), right=True)

    @torch.no_grad()
    def fit(self, smooth: torch.Tensor, measured: torch.Tensor) -> "DetectionModel":
        """Estimate the tables from cells ``[N, G]``: their smooth expression and their
        measured (log1p-normalised) expression, row for row."""
        if smooth.shape != measured.shape or smooth.shape[1] != self.edges.shape[0]:
            raise ValueError(f"smooth {list(smooth.shape)} and measured {list(measured.shape)} expression must "
                             f"both be [cells, {self.edges.shape[0]}]")
        dev = self.edges.device
        smooth, measured = smooth.float().to(dev), measured.float().to(dev)
        n, g = smooth.shape
        if n < self.max_bins:
            raise ValueError(f"the detection model needs at least {self.max_bins} cells, got {n}")
        self._size(g, self.bins_for(n, self.max_bins), dev)
        # quantile bin edges per gene (from the sorted column: no size limit, unlike torch.quantile)
        ranks = torch.linspace(0, n - 1, self.bins + 1, device=dev).round().long()
        self.edges.copy_(smooth.sort(0).values[ranks].T)
        b = self._bin(smooth)                                     # [G, N]
        group = (torch.arange(g, device=dev).unsqueeze(1) * self.bins + b).reshape(-1)
        detected = (measured.T > 0).reshape(-1)
        cells = torch.bincount(group, minlength=g * self.bins).float()
        hits = torch.bincount(group[detected], minlength=g * self.bins).float()
        self.detection.copy_((hits / cells.clamp_min(1)).reshape(g, self.bins))
        # detected-level quantiles per (gene, bin): sort by value, then stably by group
        values = measured.T.reshape(-1)[detected]
        order = torch.argsort(values, stable=True)
        grp = group[detected][order]
        order2 = torch.argsort(grp, stable=True)
        values, grp = values[order][order2], grp[order2]
        counts = hits.long()
        starts = torch.cumsum(counts, 0) - counts
        q = torch.linspace(0, 1, self.quantiles, device=dev)
        pos = starts.unsqueeze(1) + (q.unsqueeze(0) * (counts - 1).clamp_min(0).unsqueeze(1)).round().long()
        levels = torch.zeros(g * self.bins, self.quantiles, device=dev)
        has = counts > 0
        levels[has] = values[pos[has].clamp_max(max(len(values) - 1, 0))]
        levels = levels.reshape(g, self.bins, self.quantiles)
        # a bin without detections borrows the gene's nearest bin that has some (its p is 0 anyway
        # unless the bin is empty of cells; this keeps sampled levels in the gene's own range)
        has = has.reshape(g, self.bins)
        for gene in torch.nonzero(has.any(1) & ~has.all(1)).flatten().tolist():
            full = torch.nonzero(has[gene]).flatten()
            for k in torch.nonzero(~has[gene]).flatten().tolist():
                levels[gene, k] = levels[gene, full[(full - k).abs().argmin()]]
        self.levels.copy_(levels)
        self.fitted.fill_(True)
        return self

    def _check_fitted(self):
        if not bool(self.fitted):
            raise RuntimeError("the detection model is not fitted: call model.fit_detection(cells) on training "
                               "cells first (ScIDiffModel.from_data does it for principal-axes models)")

    def _gene_tables(self, smooth: torch.Tensor, gene: int):
        """Detection probability ``[N]`` and detected-level quantiles ``[N, Q]`` of one gene."""
        inner = self.edges[gene, 1:-1].contiguous()
        b = torch.searchsorted(inner, smooth[:, gene].float().contiguous(), right=True)
        return self.detection[gene, b], self.levels[gene, b]

    def _level_cdf(self, levels: torch.Tensor, value: float) -> torch.Tensor:
        """``P(level <= value | detected)`` per row of quantile tables ``levels [N, Q]``, the
        inverse of :meth:`sample`'s piecewise-linear interpolation."""
        q = self.quantiles
        if value == float("inf"):
            return levels.new_ones(levels.shape[0])
        if value == -float("inf"):
            return levels.new_zeros(levels.shape[0])
        v = torch.full((levels.shape[0], 1), float(value), device=levels.device)
        k = (torch.searchsorted(levels.contiguous(), v, right=True).squeeze(1) - 1).clamp(0, q - 2)
        left = levels.gather(1, k[:, None]).squeeze(1)
        right = levels.gather(1, (k + 1)[:, None]).squeeze(1)
        frac = ((value - left) / (right - left).clamp_min(1e-12)).clamp(0, 1)
        frac = torch.where(right > left, frac, (value >= right).float())
        pos = torch.where(value < levels[:, 0], torch.zeros_like(frac), k + frac)
        return (pos / (q - 1)).clamp(0, 1)

    def _level_at(self, levels: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
        """The detected level at cumulative probability ``cdf [N]`` (interpolated quantiles)."""
        v = cdf * (self.quantiles - 1)
        lo = v.floor().long().clamp(0, self.quantiles - 2)
        left = levels.gather(1, lo[:, None]).squeeze(1)
        right = levels.gather(1, (lo + 1)[:, None]).squeeze(1)
        return left + (v - lo) * (right - left)

    @torch.no_grad()
    def region_probability(self, smooth: torch.Tensor, within: dict[int, tuple[float, float]]) -> torch.Tensor:
        """``P(every gene j's measurement lies in [lo_j, hi_j] | smooth)`` per cell ``[N]``, the
        genes independent given the smooth state: per gene ``[0 in range] (1 - p) + p (F(hi) - F(lo))``."""
        self._check_fitted()
        prob = torch.ones(smooth.shape[0], device=self.edges.device)
        for gene, (lo, hi) in within.items():
            prob = prob * self._interval(smooth, gene, lo, hi)[0]
        return prob

    def _interval(self, smooth, gene: int, lo: float, hi: float):
        p, levels = self._gene_tables(smooth, gene)
        f_lo, f_hi = self._level_cdf(levels, lo), self._level_cdf(levels, hi)
        p_zero = (1.0 - p) * float(lo <= 0.0 <= hi)
        return p_zero + p * (f_hi - f_lo), p_zero, p, levels, f_lo, f_hi

    @torch.no_grad()
    def measure(self, smooth: torch.Tensor, detect_u: torch.Tensor, level_u: torch.Tensor) -> torch.Tensor:
        """The deterministic half of :meth:`sample`: a measured profile ``[N, G]`` for smooth
        expression ``[N, G]`` given uniforms ``detect_u`` and ``level_u`` ``[N, G]`` in [0, 1).
        A gene is detected where ``detect_u`` is below its bin's detection probability, at the
        level its bin's quantiles interpolate at ``level_u``, else measured 0
        (:func:`scidiff.export.runtime.measure` is the same map in numpy).

        On the CPU the compiled pass (``scidiff.models._measure``, one pass per value) runs where
        it was built, unless ``SCIDIFF_KERNELS=torch``; :meth:`measure_reference` is the torch
        definition it equals bit for bit (tests/test_observation.py)."""
        self._check_fitted()
        if _native is not None and smooth.device.type == "cpu" and kernel_mode() != "torch":
            return self._measure_native(smooth, detect_u, level_u)
        return self.measure_reference(smooth, detect_u, level_u)

    def _measure_native(self, smooth, detect_u, level_u) -> torch.Tensor:
        """The compiled pass: smooth cell-major, the uniforms gene-major (:meth:`sample` draws
        them so: no copy), the tables as stored."""
        arrays = [smooth.detach().float(), detect_u.detach().float().T, level_u.detach().float().T,
                  self.edges, self.detection, self.levels]
        out = torch.empty(smooth.shape, dtype=torch.float32)
        _native.measure(*(a.contiguous().numpy() for a in arrays), out.numpy(), torch.get_num_threads())
        return out

    @torch.no_grad()
    def measure_reference(self, smooth: torch.Tensor, detect_u: torch.Tensor, level_u: torch.Tensor) -> torch.Tensor:
        """:meth:`measure` in torch, cell-major: each value's bin is the number of its gene's
        (sorted) inner edges at or below it, counted edge by edge (what ``searchsorted(right=True)``
        returns, without its per-gene search), and the tables are read by ``gather`` along their
        bin axis."""
        self._check_fitted()
        smooth = smooth.float()
        inner = self.edges[:, 1:-1]                               # [G, bins - 1], sorted per gene
        count = torch.zeros(smooth.shape, dtype=torch.uint8, device=smooth.device)
        for k in range(inner.shape[1]):
            count += smooth >= inner[:, k]
        b = count.long()                                          # [N, G]
        p = self.detection.T.contiguous().gather(0, b)            # [bins, G] -> [N, G]
        v = level_u * (self.quantiles - 1)
        lo = v.floor().long().clamp_max(self.quantiles - 2)
        levels = self.levels.permute(1, 2, 0).reshape(-1, self.levels.shape[0])  # [bins * Q, G]
        at = b * self.quantiles + lo
        left, right = levels.gather(0, at), levels.gather(0, at + 1)
        level = left + (v - lo) * (right - left)
        return torch.where(detect_u < p, level, torch.zeros_like(level))

    @torch.no_grad()
    def sample(self, smooth: torch.Tensor, generator: torch.Generator | None = None,
               within: dict[int, tuple[float, float]] | None = None) -> torch.Tensor:
        """A measured profile ``[N, G]`` for each row of smooth expression ``[N, G]``: the
        uniforms of :meth:`measure` drawn from ``generator`` (detection, then levels, each
        gene-major ``[G, N]``).

        ``within``: ``{gene index: (lo, hi)}``; those genes' measurements are drawn from the
        detection model conditioned on landing in ``[lo, hi]`` (exactly: zero with probability
        ``(1 - p) / P``, else a level drawn between the interval's quantile positions). A cell for
        which a gene's interval has probability 0 keeps its free draw for that gene."""
        self._check_fitted()
        shape, dev = (smooth.shape[1], smooth.shape[0]), self.edges.device
        detect_u = torch.rand(shape, generator=generator, device=dev)
        level_u = torch.rand(shape, generator=generator, device=dev)
        out = self.measure(smooth, detect_u.T, level_u.T)
        for gene, (lo_v, hi_v) in (within or {}).items():
            prob, p_zero, p_det, levels, f_lo, f_hi = self._interval(smooth, gene, lo_v, hi_v)
            w = torch.rand(prob.shape, generator=generator, device=prob.device) * prob
            cdf = f_lo + (w - p_zero).clamp_min(0) / p_det.clamp_min(1e-12)
            draw = torch.where(w < p_zero, torch.zeros_like(w), self._level_at(levels, cdf.clamp(0, 1)))
            out[:, gene] = torch.where(prob > 0, draw, out[:, gene])
        return out
