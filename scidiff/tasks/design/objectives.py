"""Objectives (the design's objective seam): differentiable per-cell losses on generated expression
``[B, G]`` (log1p-normalised, the model's genes), 0 where a cell meets the target. Gene levels,
markers up, suppressed genes, a cell-type classifier, constraints of expression (non-negativity,
sparsity) and realism by denoising: all the same shape, summed by the designer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from .classifier import CellTypeClassifier
from .targets import GeneConstraint, PhenotypeTarget, gene_index, unknown_gene_error

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
