"""Training losses: the denoising loss and the biological constraint terms.

The constraint terms act on the predicted clean expression (log1p space) and are all off by
default (weight 0):

- non-negativity: ``mean(relu(-x0_hat)^2)``, expression cannot be negative;
- sparsity: ``mean(|x0_hat|)`` on genes observed at zero, pulling silent genes to exact zero;
- pathway consistency: for each user gene set, the squared difference between the predicted and
  the observed mean expression of the set, so programme-level activity is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def denoising_loss(model, x0: torch.Tensor, cond: dict | None, generator: torch.Generator | None = None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None):
    """Forward-diffuse cells ``x0`` (model space ``[B, G]``) to a uniform random timestep, predict
    them back and return ``(loss, x0_hat)`` with ``x0_hat`` in the same gene space. The loss is the
    squared error of the network output against its target under the model's preconditioning,
    ``|z0_hat - z0|^2 / c_out^2`` in diffusion space (EDM weighting, Karras et al. 2022;
    :meth:`ScIDiffModel.loss_scale <scidiff.models.ScIDiffModel.loss_scale>`), with
    classifier-free condition dropout applied to ``cond``."""
    x0 = model.encode(x0)
    fit_responses = response_loss(model, x0, cond) if cond else None
    b = x0.shape[0]
    if t is None:
        t = torch.randint(0, model.num_timesteps, (b,), device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    ab = model.alphas_cumprod[t].unsqueeze(-1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    if cond and model.training and model.cond_dropout > 0:
        cond = model.condition_encoder.drop(cond, model.cond_dropout, generator)
    x0_hat = model(x_t, t, cond)
    loss = (((x0_hat.float() - x0.float()) / model.loss_scale(t)) ** 2).mean()
    if fit_responses is not None:
        loss = loss + fit_responses
    return loss, model.decode(x0_hat)


def response_loss(model, z0: torch.Tensor, cond: dict) -> torch.Tensor | None:
    """Least-squares fit of the model of perturbation responses and their combinations
    (:meth:`~scidiff.models.ConditionEncoder.additive_mean`) to clean samples ``z0`` in the
    diffusion space; ``None`` for a model without perturbation covariates."""
    enc = model.condition_encoder
    if not enc.response_dim:
        return None
    return (enc.additive_mean(cond, z0.shape[0], z0.device) - z0.float()).pow(2).mean()


def nonnegativity_loss(expression: torch.Tensor) -> torch.Tensor:
    """``mean(relu(-x)^2)`` over predicted log1p expression."""
    return F.relu(-expression).pow(2).mean()


def sparsity_loss(expression: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """L1 of the predicted expression on entries observed at zero."""
    zero = (observed <= 0).to(expression.dtype)
    return (expression.abs() * zero).sum() / zero.sum().clamp_min(1.0)


def pathway_consistency_loss(expression: torch.Tensor, observed: torch.Tensor,
                             gene_sets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over gene sets of ``(mean_set(x0_hat) - mean_set(x0))^2`` per cell."""
    if not gene_sets:
        return expression.new_zeros(())
    terms = [(expression[:, idx].mean(-1) - observed[:, idx].mean(-1)).pow(2).mean() for idx in gene_sets]
    return torch.stack(terms).mean()


@dataclass
class BiologicalConstraints:
    """Weights of the constraint terms (0 = off) and the gene sets for pathway consistency
    (lists of gene indices, or names resolved against the model's genes)."""

    nonnegativity: float = 0.0
    sparsity: float = 0.0
    pathway: float = 0.0
    gene_sets: dict[str, list] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return any(w > 0 for w in (self.nonnegativity, self.sparsity, self.pathway))

    def resolve(self, gene_names: list[str] | None, device) -> list[torch.Tensor]:
        out = []
        index = {g: i for i, g in enumerate(gene_names or [])}
        for name, genes in self.gene_sets.items():
            idx = []
            for g in genes:
                if isinstance(g, str):
                    if g not in index:
                        raise KeyError(f"gene {g!r} of gene set {name!r} is not among the model's genes")
                    idx.append(index[g])
                else:
                    idx.append(int(g))
            out.append(torch.tensor(idx, dtype=torch.long, device=device))
        return out

    def __call__(self, expression, observed, gene_sets) -> dict[str, torch.Tensor]:
        terms = {}
        if self.nonnegativity > 0:
            terms["nonnegativity"] = self.nonnegativity * nonnegativity_loss(expression)
        if self.sparsity > 0:
            terms["sparsity"] = self.sparsity * sparsity_loss(expression, observed)
        if self.pathway > 0:
            terms["pathway"] = self.pathway * pathway_consistency_loss(expression, observed, gene_sets)
        return terms
