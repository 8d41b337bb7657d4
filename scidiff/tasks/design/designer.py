"""Inverse design: steer sampling toward a target phenotype (the design's objective seam).

An objective maps predicted clean expression ``[B, G]`` (log1p-normalised, over the model's
genes, by name) and the condition to a per-cell loss ``[B]`` that is 0 where the cell meets the
target. :func:`objective_guidance` wraps a denoiser with such an objective and returns a
denoiser, so every sampler runs guided without changing. It is universal guidance (Bansal et
al. 2023) written for a denoiser that predicts the clean sample ``x0``:

- forward guidance: ``x0' = x0 - s(t) (1 - ab_t) / sqrt(ab_t) grad_{x_t} L(f(x0(x_t)))``, the
  ``x0`` form of ``eps' = eps + s sqrt(1 - ab_t) grad_{x_t} L``. The gradient is taken through
  the denoiser (autograd), whose Jacobian maps it onto the directions the model can produce: for
  Gaussian data ``(1 - ab) / sqrt(ab) J = (1 - ab) S (ab S + (1 - ab) I)^-1`` with ``S`` the data
  covariance, a step preconditioned by the data, which vanishes as ``t -> 0``;
- backward guidance: ``m`` gradient steps on the clean estimate itself, ``x0' = x0 + D`` with
  ``D`` lowering ``L(f(x0 + D))``; every objective here is >= 0 with minimum 0, so each step uses
  Polyak's step size ``L / |grad|^2`` (capped by ``max_step``), which halves a squared-hinge
  residual per step.

What keeps designed cells realistic:

1. the diffusion prior: guidance only shifts the denoiser's prediction; every following step
   re-denoises under the learned model, which pulls the cell back to where real cells are (and
   moves the genes that co-vary with the targets along with them);
2. forward guidance acts through the denoiser's Jacobian and fades as ``(1 - ab_t)``, so the
   last steps are the prior's; a guidance-scale schedule (:data:`SCHEDULES`) can shift it further
   toward high noise;
3. an optional realism term (:class:`RealismObjective`): the model's own score at a small noise
   level (Tweedie: ``D(x) - x = sigma^2 grad log p``), used as a regulariser by denoising (RED,
   Romano et al. 2017; with diffusion denoisers, Mardani et al. 2023);
4. with a latent model, every cell is decoded from the model's latent, i.e. it lies in the span
   of the training cells' principal axes;
5. the constraints of expression: non-negativity (penalty, then exact clipping at 0) and
   sparsity (an L1 pull on near-zero genes and optional hard zeros, ``zero_below``);
6. choosing the prior's mode by condition instead of by gradient (``select``): each cell is
   decoded under a value of a covariate (cell type, perturbation) drawn from its posterior given
   the target, ``p(c) P(met | c)``, which the model generates as realistically as any condition;
7. retrying the misses (``retries``): a cell that misses the target is re-noised and decoded
   again (restart sampling), a local move of the prior rather than a push along the objective.

:class:`InverseDesigner` puts these together: ``InverseDesigner(model, objectives).design(
target, num_samples=32)`` starts from noise, or from source cells (DDIM inversion under their own
condition, then guided decoding), and returns the designed cells with per-target hits.
"""
from __future__ import annotations

import difflib
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .guidance import classifier_free_guidance
from .samplers import Denoiser, alphas_cumprod_of, ddim_invert, run_plan, sampler_plan

RELATIONS = (">=", "<=", "==")


class UnknownGeneError(KeyError, ValueError):
    """A gene the model does not have; the message lists close matches."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_gene_error(genes, known, what: str = "the model's genes") -> UnknownGeneError:
    """An error naming each unknown gene with its closest known names (difflib)."""
    known = [str(g) for g in known]
    upper = {g.upper(): g for g in known}
    parts = []
    for g in genes:
        close = difflib.get_close_matches(str(g), known, n=5, cutoff=0.6)
        if str(g).upper() in upper and upper[str(g).upper()] not in close:
            close.insert(0, upper[str(g).upper()])
        parts.append(f"{g!r} (close matches: {', '.join(close) if close else 'none'})")
    return UnknownGeneError(f"gene(s) not in {what} ({len(known)} genes): " + "; ".join(parts))


def gene_index(gene_to_idx) -> dict[str, int]:
    """A gene -> column mapping from a dict or an ordered list of gene names."""
    if isinstance(gene_to_idx, dict):
        return {str(k): int(v) for k, v in gene_to_idx.items()}
    return {str(g): i for i, g in enumerate(gene_to_idx)}


# -- targets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneConstraint:
    """One gene-level target: ``gene relation value`` in log1p-normalised expression, met within
    ``tolerance`` (``>=``: ``x >= value - tol``; ``<=``: ``x <= value + tol``; ``==``:
    ``|x - value| <= tol``). ``kind`` says where it came from (gene_targets, marker_genes,
    suppressed_genes)."""

    gene: str
    relation: str
    value: float
    tolerance: float
    kind: str

    def __str__(self) -> str:
        return f"{self.gene}{self.relation}{self.value:g}"

    def bounds(self) -> tuple[float, float]:
        """The interval of values that meet the constraint (tolerance included)."""
        if self.relation == ">=":
            return self.value - self.tolerance, math.inf
        if self.relation == "<=":
            return -math.inf, self.value + self.tolerance
        return self.value - self.tolerance, self.value + self.tolerance

    def met(self, values) -> np.ndarray:
        lo, hi = self.bounds()
        v = np.asarray(values, dtype=np.float64)
        return (v >= lo - 1e-6) & (v <= hi + 1e-6)


def _level_map(genes, default: float, what: str) -> dict[str, float]:
    if genes is None:
        return {}
    if isinstance(genes, str):
        genes = [genes]
    if isinstance(genes, dict):
        return {str(g): float(v) for g, v in genes.items()}
    out = {}
    for g in genes:
        if not isinstance(g, str):
            raise TypeError(f"{what} must be gene names (or a dict gene -> level); got {g!r}")
        out[g] = float(default)
    return out


class PhenotypeTarget:
    """What designed cells should look like, in the model's genes (log1p-normalised values).

    ``gene_targets``: gene -> level to reach (met within the tolerance). ``marker_genes``: genes
    that must be up, at least ``marker_level`` (a list) or at their own minimum (a dict).
    ``suppressed_genes``: genes that must be down, at most ``suppressed_level`` (list) or their own
    maximum (dict). ``cell_type``: a label of a trained :class:`CellTypeClassifier`.
    ``tolerance``: slack when checking a target (a number, or a dict gene -> number).
    """

    def __init__(self, gene_targets: dict | None = None, marker_genes=None, suppressed_genes=None,
                 cell_type: str | None = None, *, marker_level: float = 1.0, suppressed_level: float = 0.1,
                 tolerance=0.1):
        self.gene_targets = _level_map(gene_targets, 0.0, "gene_targets")
        self.marker_genes = _level_map(marker_genes, marker_level, "marker_genes")
        self.suppressed_genes = _level_map(suppressed_genes, suppressed_level, "suppressed_genes")
        self.cell_type = None if cell_type is None else str(cell_type)
        self.marker_level, self.suppressed_level = float(marker_level), float(suppressed_level)
        self.tolerance = tolerance

    # -- parsing -----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, cell_type: str | None = None, tolerance=0.1) -> "PhenotypeTarget":
        """``"IL2RA>=5,FOXP3>=4,CD8A<=0.1,GATA3=2"``: ``>=`` makes a marker with that minimum,
        ``<=`` a suppressed gene with that maximum, ``=`` (or ``==``) a level to reach."""
        markers, suppressed, levels = {}, {}, {}
        for part in (text or "").split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"\s*([^<>=\s]+)\s*(>=|<=|==|=)\s*([-+0-9.eE]+)\s*", part)
            if m is None:
                raise ValueError(f"cannot read target {part!r}: write GENE>=value, GENE<=value or GENE=value, "
                                 "comma-separated (e.g. 'IL2RA>=5,FOXP3>=4,CD8A<=0.1')")
            gene, rel, value = m.group(1), m.group(2), m.group(3)
            try:
                v = float(value)
            except ValueError:
                raise ValueError(f"target {part!r}: {value!r} is not a number") from None
            book = {">=": markers, "<=": suppressed}.get(rel, levels)
            if gene in book and book[gene] != v:
                raise ValueError(f"target {part!r}: {gene} is given twice with {rel} ({book[gene]:g} and {v:g})")
            book[gene] = v
        return cls(gene_targets=levels, marker_genes=markers, suppressed_genes=suppressed, cell_type=cell_type,
                   tolerance=tolerance)

    # -- views -------------------------------------------------------------------------------------
    def tolerance_of(self, gene: str) -> float:
        if isinstance(self.tolerance, dict):
            return float(self.tolerance.get(gene, 0.1))
        return float(self.tolerance)

    @property
    def constraints(self) -> list[GeneConstraint]:
        out = [GeneConstraint(g, "==", v, self.tolerance_of(g), "gene_targets") for g, v in self.gene_targets.items()]
        out += [GeneConstraint(g, ">=", v, self.tolerance_of(g), "marker_genes") for g, v in self.marker_genes.items()]
        out += [GeneConstraint(g, "<=", v, self.tolerance_of(g), "suppressed_genes")
                for g, v in self.suppressed_genes.items()]
        return out

    @property
    def genes(self) -> list[str]:
        return list(dict.fromkeys(c.gene for c in self.constraints))

    def is_empty(self) -> bool:
        return not self.constraints and self.cell_type is None

    def __repr__(self) -> str:
        parts = [str(c) for c in self.constraints] + ([f"cell_type={self.cell_type}"] if self.cell_type else [])
        return f"PhenotypeTarget({', '.join(parts) or 'empty'})"

    def to_dict(self) -> dict:
        return {"gene_targets": dict(self.gene_targets), "marker_genes": dict(self.marker_genes),
                "suppressed_genes": dict(self.suppressed_genes), "cell_type": self.cell_type,
                "tolerance": self.tolerance, "constraints": [str(c) for c in self.constraints]}

    # -- validation --------------------------------------------------------------------------------
    def check(self, gene_names=None) -> "PhenotypeTarget":
        """Raise on an empty target, contradictory targets for one gene (e.g. the same gene up and
        down), levels no log1p expression can meet (below 0), and genes not in ``gene_names``."""
        if self.is_empty():
            raise ValueError("the target is empty: give gene_targets, marker_genes, suppressed_genes or a cell_type "
                             "(e.g. PhenotypeTarget(marker_genes=['CD8A'], suppressed_genes=['CD4']))")
        by_gene: dict[str, list[GeneConstraint]] = {}
        for c in self.constraints:
            if not math.isfinite(c.value) or c.tolerance < 0:
                raise ValueError(f"target {c}: the level must be finite and the tolerance >= 0")
            by_gene.setdefault(c.gene, []).append(c)
        for gene, cs in by_gene.items():
            lo = max(c.bounds()[0] for c in cs)
            hi = min(c.bounds()[1] for c in cs)
            kinds = {c.kind for c in cs}
            if {"marker_genes", "suppressed_genes"} <= kinds and lo > hi:
                raise ValueError(f"contradictory targets for {gene}: up ({', '.join(str(c) for c in cs if c.relation == '>=')})"
                                 f" and down ({', '.join(str(c) for c in cs if c.relation == '<=')}) cannot both hold "
                                 f"(tolerance {cs[0].tolerance:g})")
            if lo > hi:
                raise ValueError(f"contradictory targets for {gene}: {', '.join(str(c) for c in cs)} cannot all hold "
                                 f"(tolerance {cs[0].tolerance:g})")
            if hi < 0:
                raise ValueError(f"target {', '.join(str(c) for c in cs)} asks for negative expression; log1p-"
                                 "normalised expression is >= 0")
        if gene_names is not None:
            known = set(str(g) for g in gene_names)
            unknown = [g for g in self.genes if g not in known]
            if unknown:
                raise unknown_gene_error(unknown, gene_names)
        return self


# -- objectives ------------------------------------------------------------------------------------


class ObjectiveFunction(ABC):
    """A differentiable per-cell loss on generated expression (0 = target met, lower is better).

    ``compute_loss(generated_expression [B, G], target, cond=None) -> [B]``; the expression is
    log1p-normalised over the model's genes, unclipped (so non-negativity can be penalised).
    ``weight`` multiplies the loss when the objective is called.
    """

    name = "objective"

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    @abstractmethod
    def compute_loss(self, generated_expression: torch.Tensor, target: PhenotypeTarget,
                     cond: dict | None = None) -> torch.Tensor:
        """Per-cell loss ``[B]``."""

    def applies_to(self, target: PhenotypeTarget) -> bool:
        """Whether the target asks anything of this objective (constraint terms always apply)."""
        return True

    def check(self, target: PhenotypeTarget) -> None:
        """Raise a clear error if the target cannot be scored by this objective."""

    def __call__(self, generated_expression, target, cond=None) -> torch.Tensor:
        return self.weight * self.compute_loss(generated_expression, target, cond)

    def log_potential(self, generated_expression, target, cond=None) -> torch.Tensor:
        """``log G(x)`` of the tilt ``p(x) G(x)`` that resampling targets (default: ``-loss``)."""
        return -self(generated_expression, target, cond)


class GeneExpressionObjective(ObjectiveFunction):
    """Squared distance to gene levels: ``sum_g (x_g - v_g)^2`` for ``==`` targets, and the
    squared hinge ``relu(v - x)^2`` (``>=``) or ``relu(x - v)^2`` (``<=``) for bounds. Genes are
    found by name in ``gene_to_idx`` (a dict or the ordered gene list). By default it scores the
    target's ``gene_targets``; ``kinds`` picks other parts of the target."""

    name = "gene_targets"
    kinds: tuple[str, ...] = ("gene_targets",)

    def __init__(self, gene_to_idx, weight: float = 1.0, kinds: tuple[str, ...] | None = None):
        super().__init__(weight)
        self.gene_to_idx = gene_index(gene_to_idx)
        if kinds is not None:
            self.kinds = tuple(kinds)
        self._cache: dict = {}

    def constraints(self, target: PhenotypeTarget) -> list[GeneConstraint]:
        return [c for c in target.constraints if c.kind in self.kinds]

    def applies_to(self, target) -> bool:
        return bool(self.constraints(target))

    def check(self, target) -> None:
        unknown = [c.gene for c in self.constraints(target) if c.gene not in self.gene_to_idx]
        if unknown:
            raise unknown_gene_error(unknown, list(self.gene_to_idx))

    def _tensors(self, target, device, dtype):
        cs = self.constraints(target)
        key = (tuple((c.gene, c.relation, c.value) for c in cs), device, dtype)
        if key not in self._cache:
            self.check(target)
            idx = torch.tensor([self.gene_to_idx[c.gene] for c in cs], dtype=torch.long, device=device)
            val = torch.tensor([c.value for c in cs], dtype=dtype, device=device)
            sign = torch.tensor([{">=": 1.0, "<=": -1.0, "==": 0.0}[c.relation] for c in cs], dtype=dtype,
                                device=device)
            self._cache = {key: (idx, val, sign)}
        return self._cache[key]

    def residuals(self, x: torch.Tensor, target) -> torch.Tensor:
        """``[B, n_constraints]``: how far each cell is from each constraint (0 where met exactly)."""
        idx, val, sign = self._tensors(target, x.device, x.dtype)
        diff = x[:, idx] - val
        # ">=": relu(v - x); "<=": relu(x - v); "==": x - v
        return torch.where(sign > 0, F.relu(-diff), torch.where(sign < 0, F.relu(diff), diff))

    def compute_loss(self, generated_expression, target, cond=None):
        x = generated_expression
        if not self.applies_to(target):
            return x.new_zeros(x.shape[0])
        return self.residuals(x, target).pow(2).sum(-1)

    def log_potential(self, generated_expression, target, cond=None):
        """``-sum (r / tol)^2 / 2``: a Gaussian likelihood of meeting each constraint with the
        constraint's tolerance (at least 0.05) as its width."""
        x = generated_expression
        if not self.applies_to(target):
            return x.new_zeros(x.shape[0])
        tol = torch.tensor([max(c.tolerance, 0.05) for c in self.constraints(target)], dtype=x.dtype, device=x.device)
        return -0.5 * self.weight * (self.residuals(x, target) / tol).pow(2).sum(-1)


class MarkerGeneObjective(GeneExpressionObjective):
    """Marker genes up: ``sum_g relu(level_g - x_g)^2`` over the target's ``marker_genes``."""

    name = "marker_genes"
    kinds = ("marker_genes",)


class SuppressedGeneObjective(GeneExpressionObjective):
    """Suppressed genes down: ``sum_g relu(x_g - level_g)^2`` over the target's ``suppressed_genes``."""

    name = "suppressed_genes"
    kinds = ("suppressed_genes",)


class CellTypeClassifier(nn.Module):
    """Softmax regression (multinomial logistic regression with an L2 penalty) from standardised
    log1p expression to cell-type labels; differentiable, so it can guide sampling. Train it with
    :meth:`fit` (arrays) or :meth:`fit_anndata` (real cells brought into a model's genes)."""

    def __init__(self, gene_names, classes, mean, std):
        super().__init__()
        self.gene_names, self.classes = [str(g) for g in gene_names], [str(c) for c in classes]
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.asarray(std), dtype=torch.float32))
        self.linear = nn.Linear(len(self.gene_names), len(self.classes))
        self.validation_accuracy: float | None = None

    def forward(self, expression: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, n_classes]``."""
        return self.linear((expression - self.mean.to(expression)) / self.std.to(expression))

    def class_index(self, label: str) -> int:
        if str(label) not in self.classes:
            close = difflib.get_close_matches(str(label), self.classes, n=3, cutoff=0.4)
            raise ValueError(f"cell type {label!r} is not a class of the classifier; classes: {self.classes}"
                             + (f" (close: {close})" if close else ""))
        return self.classes.index(str(label))

    @torch.no_grad()
    def predict_proba(self, expression) -> np.ndarray:
        x = torch.as_tensor(np.asarray(expression), dtype=torch.float32)
        return torch.softmax(self(x), -1).numpy()

    def predict(self, expression) -> np.ndarray:
        return np.asarray(self.classes)[self.predict_proba(expression).argmax(1)]

    @classmethod
    def fit(cls, expression, labels, gene_names, *, l2: float = 1e-3, epochs: int = 300, lr: float = 0.05,
            val_fraction: float = 0.2, seed: int = 0) -> "CellTypeClassifier":
        """Fit on real cells ``expression [N, G]`` (log1p, the model's genes) with ``labels [N]``
        by full-batch Adam on the L2-penalised cross-entropy; ``validation_accuracy`` is measured
        on a stratified ``val_fraction`` held out, then the classifier is refitted on all cells."""
        x = np.asarray(expression, dtype=np.float32)
        labels = np.asarray(labels).astype(str)
        if x.ndim != 2 or x.shape[1] != len(gene_names) or len(labels) != len(x):
            raise ValueError(f"expression {x.shape} must be [cells, {len(gene_names)} genes] with one label per cell")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"a cell-type classifier needs at least 2 classes; got {classes}")
        y = np.array([classes.index(v) for v in labels])
        rng = np.random.default_rng(seed)
        val = np.zeros(len(y), bool)
        for c in range(len(classes)):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            val[idx[: int(len(idx) * val_fraction)]] = True
        acc = None
        if val.any() and (~val).any():
            clf = cls._train(x[~val], y[~val], gene_names, classes, l2, epochs, lr, seed)
            acc = float((clf.predict(x[val]) == labels[val]).mean())
        clf = cls._train(x, y, gene_names, classes, l2, epochs, lr, seed)
        clf.validation_accuracy = acc
        return clf

    @classmethod
    def _train(cls, x, y, gene_names, classes, l2, epochs, lr, seed):
        torch.manual_seed(seed)
        std = np.maximum(x.std(0), 0.1)
        clf = cls(gene_names, classes, x.mean(0), std)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
        opt = torch.optim.Adam(clf.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad()
                loss = F.cross_entropy(clf(xt), yt) + l2 * clf.linear.weight.pow(2).sum()
                loss.backward()
                opt.step()
        return clf.eval()

    @classmethod
    def fit_anndata(cls, adata, key: str, model, *, project: bool = True, layer=None, use_raw=None,
                    **fit_kwargs) -> "CellTypeClassifier":
        """Fit on the cells of ``adata`` labelled by ``obs[key]``, in ``model``'s genes and
        normalisation. With ``project`` and a latent model, cells are first projected onto the
        model's latent (``decode(encode(x))``), the same smoothing every generated cell has."""
        from ..data import transform_like

        if key not in adata.obs:
            raise KeyError(f"obs key {key!r} is not in the data; available: {list(adata.obs.columns)}")
        cells = transform_like(model.data_spec, adata, layer=layer, use_raw=use_raw, condition_keys=[])
        x = cells.x
        if project and getattr(model, "latent_dim", None):
            with torch.no_grad():
                x = model.decode(model.encode(x))
        expr = model.data_spec.to_expression(x, clip=True).numpy()
        return cls.fit(expr, adata.obs[key].astype(str).to_numpy(), model.data_spec.gene_names, **fit_kwargs)


class CellTypeObjective(ObjectiveFunction):
    """Cross-entropy toward the target's cell type under a :class:`CellTypeClassifier`:
    ``-log p(cell_type | x)``. ``gene_to_idx`` (the model's genes) selects the classifier's genes."""

    name = "cell_type"

    def __init__(self, classifier: CellTypeClassifier, gene_to_idx=None, weight: float = 1.0):
        super().__init__(weight)
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.columns = None
        if gene_to_idx is not None:
            index = gene_index(gene_to_idx)
            missing = [g for g in classifier.gene_names if g not in index]
            if missing:
                raise unknown_gene_error(missing, list(index), "the model's genes (the classifier was trained on others)")
            cols = [index[g] for g in classifier.gene_names]
            if cols != list(range(len(index))):
                self.columns = torch.tensor(cols, dtype=torch.long)

    def applies_to(self, target) -> bool:
        return target.cell_type is not None

    def check(self, target) -> None:
        if target.cell_type is not None:
            self.classifier.class_index(target.cell_type)

    def compute_loss(self, generated_expression, target, cond=None):
        x = generated_expression
        if target.cell_type is None:
            return x.new_zeros(x.shape[0])
        if self.columns is not None:
            x = x[:, self.columns.to(x.device)]
        logits = self.classifier.to(x.device)(x.clamp_min(0.0))
        label = torch.full((x.shape[0],), self.classifier.class_index(target.cell_type), device=x.device)
        return F.cross_entropy(logits, label, reduction="none")


class NonNegativityObjective(ObjectiveFunction):
    """``sum_g relu(-x_g)^2``: log1p expression cannot be negative (the output is also clipped)."""

    name = "nonnegativity"

    def compute_loss(self, generated_expression, target, cond=None):
        return F.relu(-generated_expression).pow(2).sum(-1)


class SparsityObjective(ObjectiveFunction):
    """``sum_g relu(x_g) [x_g < threshold]`` over genes without an up/level target: an L1 pull of
    near-zero genes to exact zero (real cells express few genes; a gene at 0.03 log1p is not a
    count anyone measured)."""

    name = "sparsity"

    def __init__(self, gene_to_idx, threshold: float = 0.1, weight: float = 1.0):
        super().__init__(weight)
        self.gene_to_idx = gene_index(gene_to_idx)
        self.threshold = float(threshold)

    def compute_loss(self, generated_expression, target, cond=None):
        x = generated_expression
        mask = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        for c in target.constraints:
            if c.relation in (">=", "==") and c.gene in self.gene_to_idx:
                mask[self.gene_to_idx[c.gene]] = 0.0
        small = (x < self.threshold).to(x.dtype)
        return (F.relu(x) * small * mask).sum(-1)


class RealismObjective(ObjectiveFunction):
    """Realism by denoising (RED, Romano et al. 2017; with a diffusion denoiser as in Mardani et
    al. 2023): with ``z`` the cell in the diffusion space and ``D`` the model's denoiser at a small
    timestep ``t``, the loss's gradient is ``z - D(sqrt(ab_t) z, t)``, which by Tweedie's formula
    is ``-sigma^2`` times the model's score: it moves cells toward where the model puts density.
    The value reported is ``|z - D|^2 / 2``; the denoiser is not differentiated (cheap)."""

    name = "realism"

    def __init__(self, model, t: int | None = None, weight: float = 1.0):
        super().__init__(weight)
        self.model = model
        self.t = int(t if t is not None else max(1, model.num_timesteps // 20))

    def compute_loss(self, generated_expression, target, cond=None):
        spec, model = self.model.data_spec, self.model
        z = model.encode(spec.to_model_space(generated_expression))
        a = float(model.alphas_cumprod[self.t]) ** 0.5
        with torch.no_grad():
            tt = torch.full((z.shape[0],), self.t, dtype=torch.long, device=z.device)
            r = (z - model(a * z.detach(), tt, cond)).detach()
        # value |r|^2 / 2, gradient r (RED)
        return (z * r).sum(-1) - (z.detach() * r).sum(-1) + 0.5 * r.pow(2).sum(-1)


# -- guidance --------------------------------------------------------------------------------------

SCHEDULES: dict[str, Callable[[int, float], float]] = {
    "constant": lambda t, ab: 1.0,
    "rising": lambda t, ab: ab,            # weak at high noise, full near the data
    "falling": lambda t, ab: 1.0 - ab,     # full at high noise, fading near the data
}


def guidance_interval(low: float, high: float, num_timesteps: int) -> Callable[[int, float], float]:
    """A schedule that guides only for ``low <= t / T <= high`` (guidance in a limited interval,
    Kynkäänniemi et al. 2024: at high noise guidance collapses diversity, at low noise it only
    pushes single genes off the manifold)."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"a guidance interval needs 0 <= low < high <= 1, got ({low}, {high})")

    def weight(t: int, ab: float) -> float:
        return 1.0 if low <= t / (num_timesteps - 1) <= high else 0.0

    weight.__name__ = f"interval({low:g}, {high:g})"
    return weight


def _schedule_fn(scale_schedule, num_timesteps: int) -> Callable[[int, float], float]:
    if isinstance(scale_schedule, (tuple, list)) and len(scale_schedule) == 2:
        return guidance_interval(float(scale_schedule[0]), float(scale_schedule[1]), num_timesteps)
    if callable(scale_schedule):
        return scale_schedule
    if scale_schedule not in SCHEDULES:
        raise ValueError(f"unknown guidance schedule {scale_schedule!r}; choose one of {sorted(SCHEDULES)}, an "
                         "interval (low, high) of t / T, or a function (t, alpha_bar) -> weight")
    return SCHEDULES[scale_schedule]


def _polyak_step(loss: torch.Tensor, grad: torch.Tensor, max_step: float | None) -> torch.Tensor:
    """Per-row Polyak step ``loss / |grad|^2 * grad`` with its norm capped at ``max_step``."""
    g2 = grad.pow(2).sum(-1, keepdim=True)
    step = torch.where(g2 > 0, loss.unsqueeze(-1) / g2.clamp_min(1e-20), torch.zeros_like(g2)) * grad
    if max_step is not None:
        norm = step.norm(dim=-1, keepdim=True)
        step = step * torch.clamp(max_step / norm.clamp_min(1e-20), max=1.0)
    return step


def objective_guidance(denoiser: Denoiser, objective: Callable, schedule, *, to_expression: Callable | None = None,
                       scale: float = 1.0, scale_schedule="constant", normalize: bool = False, backward_steps: int = 0,
                       max_step: float | None = None, min_alpha_bar: float = 1e-3) -> Denoiser:
    """Universal guidance (Bansal et al. 2023) as a denoiser wrapper: returns a denoiser whose
    ``x0`` prediction is moved down the gradient of ``objective(f(x0), cond) -> [B]`` (lower is
    better; ``f = to_expression``, the identity by default).

    Forward guidance moves the prediction along ``u = (1 - ab_t) / sqrt(ab_t) grad_{x_t} L``
    (by Tweedie's second-order formula ``u = Cov[x0 | x_t] grad_{x0} L``: a step preconditioned
    by the posterior covariance, i.e. along the directions in which cells vary at this noise
    level): ``x0' = x0 - w(t) lam u`` with ``w(t) = scale * scale_schedule(t, ab_t)``
    (:data:`SCHEDULES` or a function). ``normalize``: ``lam = L / <grad_{x0} L, u>``, Polyak's step
    size in that metric (the step that zeroes the linearised loss; halves a squared-hinge
    residual), so ``scale = 1`` is one full step whatever the loss's units; otherwise ``lam = 1``
    (plain universal guidance, where ``scale`` acts as an inverse likelihood variance). The
    gradient goes through the denoiser (autograd inside ``torch.enable_grad``, so no-grad samplers
    work). Steps where ``ab_t < min_alpha_bar`` (pure noise, where ``1/sqrt(ab_t)`` explodes and
    ``x0`` carries no information) are left unguided. ``backward_steps`` adds that many Polyak
    gradient steps on the clean estimate itself (backward guidance), weighted by the same
    schedule. ``max_step`` caps each step's norm per cell, in the diffusion space's units."""
    ab = alphas_cumprod_of(schedule)
    weight = _schedule_fn(scale_schedule, len(ab))
    f = to_expression or (lambda x: x)
    scale, backward_steps = float(scale), int(backward_steps)

    def guided(x_t: torch.Tensor, t: torch.Tensor, cond: dict | None) -> torch.Tensor:
        ti = int(t.reshape(-1)[0])
        a = ab[ti]
        w = weight(ti, a)
        if a < min_alpha_bar or w == 0.0 or (scale == 0.0 and backward_steps == 0):
            return denoiser(x_t, t, cond)
        with torch.enable_grad():
            if scale != 0.0:
                x = x_t.detach().requires_grad_(True)
                x0 = denoiser(x, t, cond)
                loss = objective(f(x0), cond)
                grad_t, grad_0 = torch.autograd.grad(loss.sum(), (x, x0))
                u = ((1.0 - a) / math.sqrt(a)) * grad_t
                if normalize:
                    slope = (grad_0 * u).sum(-1, keepdim=True)
                    lam = torch.where(slope > 0, loss.detach().unsqueeze(-1) / slope.clamp_min(1e-20),
                                      torch.zeros_like(slope))
                    u = lam * u
                step = scale * w * u
                if max_step is not None:
                    step = step * torch.clamp(max_step / step.norm(dim=-1, keepdim=True).clamp_min(1e-20), max=1.0)
                x0 = x0.detach() - step
            else:
                x0 = denoiser(x_t, t, cond).detach()
            for _ in range(backward_steps):
                z = x0.detach().requires_grad_(True)
                loss = objective(f(z), cond)
                (grad,) = torch.autograd.grad(loss.sum(), z)
                x0 = x0.detach() - w * _polyak_step(loss.detach(), grad, max_step)
        return x0.detach()

    return guided


# -- the designer ----------------------------------------------------------------------------------


@dataclass
class DesignResult:
    """Designed cells and how they were made. ``expression``: ``[N, G]`` log1p-normalised
    (clipped at 0) over ``gene_names``; ``source``: the source cells' expression (paired row by
    row) or ``None``; ``met``: constraint text -> per-cell bool; ``loss``: final per-cell
    objective; ``condition``: the labels decoded under; ``path``: per step the ``x0`` prediction
    in the diffusion space ``[steps, N, D]`` when recorded."""

    expression: np.ndarray
    gene_names: list[str]
    target: PhenotypeTarget
    met: dict[str, np.ndarray]
    loss: np.ndarray
    source: np.ndarray | None = None
    condition: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    path: torch.Tensor | None = None

    @property
    def all_met(self) -> np.ndarray:
        return met_every_target(self.met, len(self.expression))

    def to_anndata(self):
        import anndata as ad
        import pandas as pd

        obs = pd.DataFrame({f"met_{k}": v for k, v in self.met.items()},
                           index=[f"designed_{i}" for i in range(len(self.expression))])
        obs["met_all"] = self.all_met
        obs["objective"] = self.loss
        for k, v in self.condition.items():
            obs[k] = pd.Categorical([str(s) for s in v]) if isinstance(v, list) else str(v)
        out = ad.AnnData(X=self.expression.astype(np.float32), obs=obs)
        out.var_names = list(self.gene_names)
        if self.source is not None:
            out.layers["source"] = self.source.astype(np.float32)
        out.uns["scidiff_design"] = _h5_keys({"target": _jsonable(self.target.to_dict()),
                                              "settings": _jsonable(self.settings)})
        return out


def _h5_keys(obj):
    """``obj`` for ``.uns``: a mapping whose keys hold ``/`` (labels such as ``CD8+/CD45RA+``,
    which HDF5 would read as a path) becomes ``{"names": [...], "values": [...]}``."""
    if not isinstance(obj, dict):
        return obj
    if any("/" in k for k in obj):
        return {"names": list(obj), "values": [_h5_keys(v) for v in obj.values()]}
    return {k: _h5_keys(v) for k, v in obj.items()}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.integer, int)) and not isinstance(obj, bool):
        return int(obj)
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    return str(obj)


def met_every_target(met: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Per cell, whether it meets every target of ``met`` (target -> per-cell bool); all ``True``
    for no target."""
    return np.all(np.stack(list(met.values())), axis=0) if met else np.ones(n, bool)


def constraint_hits(expression: np.ndarray, gene_names, target: PhenotypeTarget) -> dict[str, np.ndarray]:
    """Constraint text -> per-cell bool (met within its tolerance)."""
    index = gene_index(gene_names)
    return {str(c): c.met(expression[:, index[c.gene]]) for c in target.constraints}


class InverseDesigner:
    """Design cells that meet a :class:`PhenotypeTarget` by guided sampling from ``model``.

    ``objectives``: :class:`ObjectiveFunction` instances or callables ``(expression, target,
    cond) -> [B]``; by default the gene objectives (levels, markers up, suppressed down) plus a
    :class:`CellTypeObjective` when ``classifier`` is given. Constraint terms are added by weight:
    ``nonnegativity_weight`` (on by default), ``sparsity_weight`` (L1 pull of genes below
    ``sparsity_threshold`` to 0) and ``realism_weight`` (:class:`RealismObjective`).

    ``observed``: design measured cells. Guidance works on each cell's smooth expression (the
    model's output, differentiable); the designed cell, the targets' check (for retries and the
    screen) and the report then use a measurement of it through the model's detection model
    (:meth:`scidiff.models.ScIDiffModel.observe`: sparse, with the data's detection rates and
    levels), which is what real cells are compared with; by default the target genes are
    measured within their targets (``design(condition_measurement=...)``).
    """

    def __init__(self, model, objectives=None, *, classifier: CellTypeClassifier | None = None,
                 nonnegativity_weight: float = 1.0, sparsity_weight: float = 0.0, sparsity_threshold: float = 0.1,
                 realism_weight: float = 0.0, realism_t: int | None = None, observed: bool = False):
        if getattr(model, "data_spec", None) is None:
            raise ValueError("inverse design needs a model with a gene list (train it through scidiff.setup_anndata)")
        detection = getattr(model, "detection", None)
        if observed and (detection is None or not bool(detection.fitted)):
            raise ValueError("observed=True needs a principal-axes model with a fitted detection model "
                             "(model.fit_detection(cells); ScIDiffModel.from_data fits it)")
        self.model, self.observed = model, bool(observed)
        self.gene_names = list(model.data_spec.gene_names)
        self.gene_to_idx = gene_index(self.gene_names)
        if objectives is None:
            objectives = [GeneExpressionObjective(self.gene_to_idx), MarkerGeneObjective(self.gene_to_idx),
                          SuppressedGeneObjective(self.gene_to_idx)]
            if classifier is not None:
                objectives.append(CellTypeObjective(classifier, self.gene_to_idx))
        elif classifier is not None:
            objectives = list(objectives) + [CellTypeObjective(classifier, self.gene_to_idx)]
        self.objectives = list(objectives)
        self.constraints: list[ObjectiveFunction] = []
        if nonnegativity_weight:
            self.constraints.append(NonNegativityObjective(nonnegativity_weight))
        if sparsity_weight:
            self.constraints.append(SparsityObjective(self.gene_to_idx, sparsity_threshold, sparsity_weight))
        if realism_weight:
            self.constraints.append(RealismObjective(model, realism_t, realism_weight))

    # -- the objective seam ------------------------------------------------------------------------
    def check(self, target: PhenotypeTarget) -> PhenotypeTarget:
        """Validate ``target`` against the model's genes and every objective."""
        if not isinstance(target, PhenotypeTarget):
            raise TypeError(f"target must be a PhenotypeTarget, got {type(target).__name__}")
        target.check(self.gene_names)
        active = []
        for obj in self.objectives:
            if isinstance(obj, ObjectiveFunction):
                obj.check(target)
                if obj.applies_to(target):
                    active.append(obj)
            else:
                active.append(obj)
        if target.cell_type is not None and not any(isinstance(o, CellTypeObjective) for o in self.objectives):
            raise ValueError(f"the target asks for cell type {target.cell_type!r} but the designer has no "
                             "cell-type classifier: pass classifier=CellTypeClassifier.fit_anndata(...)")
        covered = {c.kind for c in target.constraints}
        scored = {k for o in self.objectives if isinstance(o, GeneExpressionObjective) for k in o.kinds}
        if covered - scored and all(isinstance(o, ObjectiveFunction) for o in self.objectives):
            raise ValueError(f"no objective scores the target's {sorted(covered - scored)}")
        if not active:
            raise ValueError(f"no objective applies to {target!r}")
        return target

    def loss_fn(self, target: PhenotypeTarget, include_constraints: bool = True) -> Callable:
        """The objective seam for ``target``: ``(expression [B, G], cond) -> loss [B]``."""
        terms = list(self.objectives) + (self.constraints if include_constraints else [])

        def loss(expression: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
            total = expression.new_zeros(expression.shape[0])
            for obj in terms:
                total = total + obj(expression, target, cond)
            return total

        return loss

    def to_expression(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> log1p expression (unclipped, differentiable)."""
        return self.model.data_spec.to_expression(self.model.decode(z), clip=False)

    def guided_denoiser(self, target: PhenotypeTarget, *, guidance_scale: float = 10.0, schedule=(0.2, 0.7),
                        normalize: bool = False, backward_steps: int = 0, max_step: float | None = None,
                        cfg_scale: float = 1.0,
                        null_cond: dict | None = None, alphas_cumprod=None) -> Denoiser:
        """The model wrapped by classifier-free guidance (``cfg_scale != 1``, against
        ``null_cond``) and then by :func:`objective_guidance` toward ``target``."""
        self.check(target)
        base = self.model
        if cfg_scale != 1.0:
            base = classifier_free_guidance(self.model, cfg_scale, null_cond)
        ab = self.model.scheduler if alphas_cumprod is None else alphas_cumprod
        return objective_guidance(base, self.loss_fn(target), ab, to_expression=self.to_expression,
                                  scale=guidance_scale, scale_schedule=schedule, normalize=normalize,
                                  backward_steps=backward_steps, max_step=max_step)

    def classifier(self) -> CellTypeClassifier | None:
        for obj in self.objectives:
            if isinstance(obj, CellTypeObjective):
                return obj.classifier
        return None

    def hits(self, expression: np.ndarray, target: PhenotypeTarget) -> dict[str, np.ndarray]:
        """Per target, which cells meet it: the gene constraints within their tolerance and, with a
        classifier, ``cell_type=T`` where the classifier's most likely type is ``T``."""
        met = constraint_hits(expression, self.gene_names, target)
        clf = self.classifier()
        if target.cell_type is not None and clf is not None:
            cols = [self.gene_to_idx[g] for g in clf.gene_names]
            met[f"cell_type={target.cell_type}"] = clf.predict(expression[:, cols]) == target.cell_type
        return met

    # -- sources and conditions --------------------------------------------------------------------
    def _source(self, source, num_samples: int, rng: np.random.Generator):
        """Source cells -> (model-space x [N, G], their own condition codes or {}), resampled to N."""
        from ..data import CellData, transform_like

        spec = self.model.data_spec
        if source is None:
            return None, {}
        if not isinstance(source, (CellData, torch.Tensor, np.ndarray)):
            source = transform_like(spec, source)
        if isinstance(source, CellData):
            x, codes = source.x, {k: v for k, v in source.covariates.items()
                                  if k in self.model.condition_encoder.keys}
            for key in spec.perturbation_keys:  # a perturbation column absent from obs means control
                codes.setdefault(key, torch.zeros(len(x), len(spec.categorical[key]) + 1))
        else:
            x = torch.as_tensor(np.asarray(source) if isinstance(source, np.ndarray) else source, dtype=torch.float32)
            if x.ndim != 2 or x.shape[1] != spec.n_genes:
                raise ValueError(f"source cells must be [cells, {spec.n_genes}] in the model's space; got {tuple(x.shape)}")
            codes = {}
        if len(x) == 0:
            raise ValueError("the source has no cells")
        pick = np.arange(len(x))
        if num_samples != len(x):
            pick = rng.choice(len(x), num_samples, replace=num_samples > len(x))
        pick = torch.as_tensor(pick, dtype=torch.long)
        return x[pick], {k: v[pick] for k, v in codes.items()}

    def _condition(self, condition, source_codes: dict, n: int) -> dict[str, torch.Tensor]:
        """Decoding condition: the source's own non-perturbation covariates (perturbations at
        null, so the prior spans every condition), overridden by ``condition``'s labels."""
        spec = self.model.data_spec
        cond = {k: v for k, v in source_codes.items() if k not in spec.perturbation_keys and k != spec.dose_key}
        cond.update(self.model.encode_conditioning(condition, n) if condition else {})
        return cond

    # -- design ------------------------------------------------------------------------------------
    def log_potential_fn(self, target: PhenotypeTarget, sharpness: float = 1.0) -> Callable:
        """``(expression, cond) -> log G [B]``: the tilt resampling targets, summed over the
        objectives (gene targets: Gaussian in units of their tolerance; a classifier:
        ``log p(type | x)``, so that ``p(x) G(x)`` is ``p(x | type)``), times ``sharpness``."""
        def log_g(expression, cond=None):
            total = expression.new_zeros(expression.shape[0])
            for obj in self.objectives:
                total = total + (obj.log_potential(expression, target, cond) if isinstance(obj, ObjectiveFunction)
                                 else -obj(expression, target, cond))
            return sharpness * total

        return log_g

    def measurement_region(self, target: PhenotypeTarget) -> dict[int, tuple[float, float]]:
        """``{gene index: (lo, hi)}``: the values of each target gene that meet its constraints
        (tolerances included), where an observed design draws that gene's measurement."""
        region: dict[int, tuple[float, float]] = {}
        for c in target.constraints:
            lo, hi = c.bounds()
            old_lo, old_hi = region.get(self.gene_to_idx[c.gene], (-math.inf, math.inf))
            region[self.gene_to_idx[c.gene]] = (max(lo, old_lo), min(hi, old_hi))
        return region

    def designed_expression(self, z: torch.Tensor, zero_below: float | None = None,
                            generator: torch.Generator | None = None,
                            within: dict[int, tuple[float, float]] | None = None) -> torch.Tensor:
        """Cells in diffusion space -> designed expression: a measurement of each (``observed``;
        ``within``: conditioned on those genes' intervals) or its smooth expression clipped at 0;
        exact zeros below ``zero_below``."""
        if self.observed:
            expr = self.model.observe(self.model.decode(z), generator, within)
        else:
            expr = self.to_expression(z).clamp_min(0.0)
        if zero_below:
            expr = torch.where(expr < zero_below, torch.zeros_like(expr), expr)
        return expr

    def _met_all(self, expr: torch.Tensor, target: PhenotypeTarget) -> torch.Tensor:
        return torch.as_tensor(met_every_target(self.hits(expr.cpu().numpy(), target), len(expr)))

    def _retry(self, z, expr, cond, target, retries: int, retry_noise: float, sampler: str, steps: int, eta: float,
               generator, zero_below, guidance: dict, within=None) -> tuple[torch.Tensor, int]:
        """Restart the cells of ``z`` whose designed expression ``expr`` misses the target from
        noise level ``retry_noise`` (forward-diffused from where they are), ``retries`` times at
        most. Returns the designed expression after the retries and the sampler steps spent."""
        if not 0.0 < retry_noise <= 1.0:
            raise ValueError(f"retry_noise must lie in (0, 1], got {retry_noise}")
        ab_full = self.model.scheduler.alphas_cumprod
        t_r = max(1, int(round(retry_noise * (len(ab_full) - 1))))
        ab = ab_full[: t_r + 1]
        plan = sampler_plan(sampler, ab, max(1, int(round(steps * t_r / (len(ab_full) - 1)))), eta=eta)
        denoiser = self.guided_denoiser(target, alphas_cumprod=ab, **guidance)
        a = float(ab[t_r])
        z, expr, spent = z.clone(), expr.clone(), 0
        for _ in range(retries):
            miss = (~self._met_all(expr, target)).nonzero().squeeze(-1).to(z.device)
            if not len(miss):
                break
            x_t = math.sqrt(a) * z[miss] + math.sqrt(1 - a) * torch.randn(
                z[miss].shape, generator=generator, device=z.device, dtype=z.dtype)
            z[miss] = run_plan(denoiser, x_t, plan, cond={k: v[miss] for k, v in cond.items()}, generator=generator)
            expr[miss] = self.designed_expression(z[miss], zero_below, generator, within)
            spent += len(miss) * len(plan)
        return expr, spent

    def condition_posterior(self, target: PhenotypeTarget, key: str, source=None, *, condition: dict | None = None,
                            n_cells: int = 128, steps: int = 50, seed: int = 0):
        """Which value of covariate ``key`` (a cell type, a perturbation) makes the target likely:
        ``p(c | target) = p(c) P(target met | c) / sum``, with ``P(met | c)`` the fraction of
        ``n_cells`` unguided cells under ``c`` that meet the target (the in-silico screen,
        :func:`scidiff.regulators.screen_perturbations`: counterfactuals of ``source``, else
        cells from the same noise) and ``p(c)`` the value's share of the training cells
        (:meth:`scidiff.data.DataSpec.condition_prior`). Returns a table with the columns
        ``condition`` (a dict), ``label``, ``prior``, ``fraction_met``, ``posterior``, in
        candidate order."""
        import pandas as pd

        from ..regulators import candidate_conditions, condition_label, screen_perturbations

        spec = self.model.data_spec
        if key in spec.perturbation_keys:
            candidates = [c for c in candidate_conditions(self.model) if key in c]
        elif key in spec.categorical:
            candidates = [{key: v} for v in spec.categorical[key]]
        else:
            raise ValueError(f"cannot select over {key!r}: not a categorical covariate of the model; "
                             f"choose one of {sorted(spec.categorical)}")
        screen = screen_perturbations(self, target, source, condition=condition, candidates=candidates,
                                      n_cells=n_cells, steps=steps, seed=seed).set_index("condition")
        labels = [c[key] for c in candidates]
        prior = spec.condition_prior(key, labels)
        per_label = {v: labels.count(v) for v in labels}  # a perturbation's prior is shared by its doses
        prior = prior / np.array([per_label[v] for v in labels])
        rate = np.array([screen.loc[condition_label(c), "fraction_met"] for c in candidates])
        joint = prior * rate
        if joint.sum() == 0:
            raise ValueError(f"no value of {key!r} gave a cell meeting {target!r} in a screen of {n_cells} cells "
                             "each: raise n_cells, or design without select")
        return pd.DataFrame({"condition": candidates, "label": [condition_label(c) for c in candidates],
                             "prior": prior / prior.sum(), "fraction_met": rate, "posterior": joint / joint.sum()})

    @staticmethod
    def _selected_condition(table, num_samples: int) -> tuple[dict, dict]:
        """Cells per condition in proportion to the posterior (largest remainder), as per-cell
        label lists ``{key: [...]}`` and the counts per condition label."""
        share = table["posterior"].to_numpy() * num_samples
        counts = np.floor(share).astype(int)
        counts[np.argsort(-(share - counts), kind="stable")[: num_samples - counts.sum()]] += 1
        cells: dict[str, list] = {}
        keys = list(dict.fromkeys(k for c in table["condition"] for k in c))
        for cond, k in zip(table["condition"], counts):
            for key in keys:
                cells.setdefault(key, []).extend([cond.get(key, float("nan"))] * int(k))
        return cells, {label: int(k) for label, k in zip(table["label"], counts) if k}

    @torch.no_grad()
    def design(self, target: PhenotypeTarget, num_samples: int = 32, *, source=None, condition: dict | None = None,
               sampler: str = "ddim", steps: int = 50, eta: float | None = None, guidance_scale: float = 10.0,
               schedule=(0.2, 0.7), normalize: bool = False, backward_steps: int = 0, max_step: float | None = None,
               cfg_scale: float = 1.0, strength: float = 1.0, resample: bool | None = None, resample_every: int = 2,
               resample_until: float = 0.8, sharpness: float = 4.0, zero_below: float | None = None,
               select: str | None = None, screen_cells: int = 128, retries: int = 0, retry_noise: float = 0.7,
               condition_measurement: bool = True, reweight_measurement: bool = False, seed: int = 0,
               batch_size: int = 1024,
               record_path: bool = False, progress: bool = False) -> DesignResult:
        """Generate ``num_samples`` cells meeting ``target``.

        ``source``: cells to start from (an AnnData in the data's genes, a
        :class:`scidiff.data.CellData`, or model-space rows); each is inverted by DDIM under its
        own condition up to ``strength * T`` (1 = pure noise level, smaller keeps more of the
        source, as SDEdit, Meng et al. 2022) and decoded with guidance; without a source, cells
        start from noise. ``condition``: labels to decode under (default: the source's own
        covariates with perturbations at null). ``guidance_scale``, ``schedule``, ``normalize``,
        ``backward_steps``, ``max_step``: see :func:`objective_guidance`; ``cfg_scale``:
        classifier-free guidance on the condition.

        ``resample`` (default: on without a source, off with one, which keeps designed and source
        cells paired): sequential Monte Carlo over the batch (Feynman-Kac steering, Singhal et al.
        2025; twisted SMC, Wu et al. 2023): every ``resample_every`` steps, until
        ``resample_until`` of the way, each cell is weighted by the change of
        :meth:`log_potential_fn` (times ``sharpness``) on the unguided model's prediction and the
        batch is resampled
        (systematically) when the effective sample size drops below half. This picks among the
        prior's modes (which cell type), which a gradient on a blurred early prediction cannot;
        the sampler is then made stochastic (``eta`` defaults to 1) so copies diverge.
        ``select``: a categorical covariate (e.g. ``'cell_type'``, a perturbation key) whose value
        is chosen for each designed cell from its posterior given the target
        (:meth:`condition_posterior`, a screen of ``screen_cells`` cells per value): cells are
        split among the values in proportion to it, so the prior's mode is picked by the condition
        (which the model generates realistically) and guidance only closes the remaining gap.
        ``retries``: cells that miss the target are re-noised to ``retry_noise * T`` and decoded
        again (with the same guidance), up to ``retries`` times: restart sampling (Xu et al. 2023)
        applied to the misses only, a local move of the prior around each cell, so a retried cell
        is as realistic as a first draw. ``settings['sampler_steps_per_cell']`` counts the steps
        spent per designed cell on inversion, decoding, retries and the screen (the cost to set
        against unguided sampling + rejection).
        ``condition_measurement`` (observed designs): each cell's measurement of the target genes
        is drawn from the detection model conditioned on meeting their constraints,
        ``p(measured | smooth, region)``, exactly per gene; the smooth cells stay as guidance and
        ``select`` made them. A cell whose smooth state cannot be measured on target
        (``P(region | smooth) = 0``) keeps a free draw and counts as a miss (``retries``).
        ``reweight_measurement`` also resamples the batch (systematically) in proportion to
        ``P(region | smooth)``, which makes the cells the model's measured posterior given the
        target, ``p(smooth) P(region | smooth) p(measured | smooth, region)`` (sampling importance
        resampling, Rubin 1988) up to the guided proposal; on pbmc68k that favoured smooth states
        the real cells do not support (``bench/bench_design.py``). The screen draws free
        measurements.
        ``zero_below``: expression below this is set to exact zero (sparsity). Returns a
        :class:`DesignResult` (with resampling, ``source`` rows follow each cell's ancestor).
        """
        self.check(target)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        resample = (source is None) if resample is None else bool(resample)
        if resample and resample_every < 1:
            raise ValueError(f"resample_every must be >= 1, got {resample_every}")
        eta = (1.0 if resample else 0.0) if eta is None else float(eta)
        model, spec = self.model, self.model.data_spec
        device = next(model.parameters()).device
        rng = np.random.default_rng(seed)
        src_x, src_codes = self._source(source, num_samples, rng)
        cond_all = self._condition(condition, src_codes, num_samples)
        selection, screen_steps = None, 0
        if select is not None:
            table = self.condition_posterior(target, select, source, condition=condition, n_cells=screen_cells,
                                             steps=steps, seed=seed)
            screen_steps = (len(table) + (source is not None)) * screen_cells * steps  # decodings (+ inversion)
            cells, per_condition = self._selected_condition(table, num_samples)
            cond_all.update(model.encode_conditioning(cells, num_samples))
            selection = {"key": select, "cells": per_condition,
                         "posterior": {k: round(float(v), 4) for k, v in zip(table["label"], table["posterior"])},
                         "fraction_met": {k: round(float(v), 4) for k, v in zip(table["label"], table["fraction_met"])}}
        ab_full = model.scheduler.alphas_cumprod
        t_top = max(1, int(round(strength * (len(ab_full) - 1))))
        ab = ab_full[: t_top + 1]
        n_steps = max(1, int(round(steps * t_top / (len(ab_full) - 1))))
        plan = sampler_plan(sampler, ab, n_steps, eta=eta)
        if resample and not any(st.noise_coef > 0 for st in plan[:-1]):
            raise ValueError(f"resampling needs a stochastic sampler so that copies diverge: use ddim with eta > 0, "
                             f"ddpm or euler_maruyama (got {sampler!r}, eta={eta:g})")
        gen = torch.Generator(device=device).manual_seed(int(seed))
        log_g = self.log_potential_fn(target, sharpness) if resample else None
        was_training = model.training
        model.eval()
        within = self.measurement_region(target) if self.observed and condition_measurement else None
        outs, paths, ancestry, n_resampled, retry_steps, region_ess = [], [], [], 0, 0, []
        try:
            for start in range(0, num_samples, batch_size):
                sl = slice(start, min(start + batch_size, num_samples))
                b = sl.stop - sl.start
                cond = {k: v[sl].to(device) for k, v in cond_all.items()}
                null = None
                if cfg_scale != 1.0:
                    null = model.condition_encoder.null_condition(b, device)
                    cond = {**null, **cond}
                if src_x is not None:
                    z0 = model.encode(src_x[sl].to(device))
                    src = {k: v[sl].to(device) for k, v in src_codes.items()}
                    x_T = ddim_invert(model, z0, ab, n_steps, cond=src)
                else:
                    x_T = torch.randn(b, model.diffusion_dim, generator=gen, device=device)
                denoiser = self.guided_denoiser(target, guidance_scale=guidance_scale, schedule=schedule,
                                                normalize=normalize, backward_steps=backward_steps, max_step=max_step,
                                                cfg_scale=cfg_scale, null_cond=null, alphas_cumprod=ab)
                prior = model if cfg_scale == 1.0 else classifier_free_guidance(model, cfg_scale, null)
                z, idx, rec, k = _run_plan_smc(denoiser, x_T, plan, cond, gen, log_g, self.to_expression,
                                               resample_every if resample else 0, int(resample_until * len(plan)),
                                               record_path, progress, prior=prior)
                if within and reweight_measurement:
                    w = model.detection.region_probability(spec.to_expression(model.decode(z), clip=False), within)
                    if float(w.sum()) > 0:
                        region_ess.append(float(w.sum() ** 2 / (w ** 2).sum()))
                        pick = systematic_resample(w, gen)
                        z, idx = z[pick], idx[pick]
                        if record_path:
                            rec = rec[:, pick.cpu()]
                expr = self.designed_expression(z, zero_below, gen, within)
                if retries:
                    expr, steps_taken = self._retry(
                        z, expr, {k: v[idx] for k, v in cond.items()}, target, retries, retry_noise, sampler, steps,
                        eta, gen, zero_below, dict(guidance_scale=guidance_scale, schedule=schedule,
                                                   normalize=normalize, backward_steps=backward_steps,
                                                   max_step=max_step, cfg_scale=cfg_scale, null_cond=null),
                        within)
                    retry_steps += steps_taken
                outs.append(expr)
                ancestry.append(idx.cpu() + start)
                n_resampled += k
                if record_path:
                    paths.append(rec)
        finally:
            model.train(was_training)
        ancestry = torch.cat(ancestry)
        cond_all = {k: v[ancestry] for k, v in cond_all.items()}
        expr = torch.cat(outs)
        loss = self.loss_fn(target, include_constraints=False)(expr, {k: v.to(device) for k, v in cond_all.items()})
        expr = expr.cpu().numpy()
        source_expr = None if src_x is None else spec.to_expression(src_x[ancestry], clip=True).numpy()
        labels = spec.decode_conditions(cond_all) if cond_all else {}
        settings = {"num_samples": num_samples, "sampler": sampler, "steps": n_steps, "eta": eta,
                    "guidance_scale": guidance_scale,
                    "schedule": (schedule if isinstance(schedule, (str, tuple, list))
                                 else getattr(schedule, "__name__", "custom")),
                    "normalize": normalize, "backward_steps": backward_steps, "max_step": max_step,
                    "cfg_scale": cfg_scale, "strength": strength, "resample": resample,
                    "resample_every": resample_every if resample else None, "sharpness": sharpness,
                    "resampling_events": n_resampled, "select": selection, "retries": retries,
                    "retry_noise": retry_noise if retries else None,
                    "sampler_steps_per_cell": {"inversion": len(plan) if src_x is not None else 0,
                                               "decoding": len(plan),
                                               "retries": round(retry_steps / num_samples, 2),
                                               "screen": round(screen_steps / num_samples, 2)},
                    "distinct_ancestors": int(len(torch.unique(ancestry))), "zero_below": zero_below,
                    "observed": self.observed, "seed": seed,
                    "measurement": (None if not self.observed else "free" if not within else
                                    "conditioned on the target genes' intervals"
                                    + (", cells reweighted by its probability" if reweight_measurement else "")),
                    "measurement_effective_sample_size": (round(sum(region_ess) / num_samples, 4) if region_ess
                                                          else None),
                    "source": "cells" if src_x is not None else "noise",
                    "objectives": [getattr(o, "name", type(o).__name__) for o in self.objectives],
                    "constraints": {o.name: o.weight for o in self.constraints}}
        return DesignResult(expression=expr, gene_names=self.gene_names, target=target,
                            met=self.hits(expr, target), loss=loss.cpu().numpy(),
                            source=source_expr, condition=labels, settings=settings,
                            path=torch.cat(paths, dim=1) if record_path else None)


def systematic_resample(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices drawn by systematic resampling (Kitagawa 1996): one uniform offset, ``N`` evenly
    spaced points on the cumulative weights."""
    n = weights.shape[0]
    u = (torch.rand((), generator=generator, device=weights.device) + torch.arange(n, device=weights.device)) / n
    cdf = torch.cumsum(weights / weights.sum(), 0)
    return torch.searchsorted(cdf, u.to(cdf.dtype)).clamp_max(n - 1)


def _run_plan_smc(denoiser, x_T, plan, cond, generator, log_g, to_expression, every: int, until: int,
                  record: bool, progress: bool, prior=None):
    """Walk a sampler plan (as :func:`scidiff.sampling.run_plan`) with ``denoiser``, resampling
    by the change of ``log_g`` on the ``prior`` denoiser's prediction (difference potentials,
    which telescope to ``G`` of the final cell). The prior's, not the guided prediction: guidance
    would make every cell look on target and leave nothing to select. Returns ``(x, ancestor
    index per row, recorded x0 path, resamplings)``."""
    if progress:
        from tqdm.auto import tqdm

        plan = tqdm(plan, desc="designing", leave=False)
    x, mid, prev = x_T, None, None
    n = x.shape[0]
    ancestry = torch.arange(n, device=x.device)
    logw = torch.zeros(n, device=x.device)
    last = torch.zeros(n, device=x.device)
    rec, events = [], 0
    for i, st in enumerate(plan):
        x_in = mid if st.from_mid else x
        t = torch.full((x_in.shape[0],), st.t, dtype=torch.long, device=x_in.device)
        x0 = denoiser(x_in, t, cond)
        check = every and not st.to_mid and (i + 1) % every == 0 and i + 1 < until
        x0_prior = (prior or denoiser)(x_in, t, cond) if check else None
        out = st.x_coef * x + st.x0_coef * x0
        if st.prev_coef:
            out = out + st.prev_coef * prev
        if st.noise_coef > 0:
            out = out + st.noise_coef * torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        if st.to_mid:
            mid = out
        else:
            x = out
        prev = x0
        if record:
            rec.append(x0.detach().cpu())
        if check:
            pot = log_g(to_expression(x0_prior), cond).float()
            logw = logw + pot - last
            last = pot
            w = torch.softmax(logw, 0)
            if float(1.0 / (w ** 2).sum()) < n / 2:
                idx = systematic_resample(w, generator)
                x, prev, last, ancestry = x[idx], prev[idx], last[idx], ancestry[idx]
                cond = {k: (v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v)[idx] for k, v in cond.items()}
                rec = [r[idx.cpu()] for r in rec]
                logw = torch.zeros(n, device=x.device)
                events += 1
    return x, ancestry, (torch.stack(rec) if record else None), events
