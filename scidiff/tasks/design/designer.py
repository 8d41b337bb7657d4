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
target, n=32)`` starts from noise, or from source cells (DDIM inversion under their own
condition, then guided decoding), and returns the designed cells with per-target hits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ...checks import condition_mapping, real_number, whole_number, yes_no
from ...data.spec import scanpy_log1p, typed_labels
from ...diffusion.guidance import classifier_free_guidance, objective_guidance
from ...diffusion.plans import sampler_plan
from ...diffusion.samplers import Denoiser, ddim_invert, run_plan
from ...diffusion.smc import systematic_resample, walk_smc
from ...groups import share_out
from ...models.cell_draws import check_seed
from ...models.diffusion_model import OBSERVED
from .._keywords import no_other_keywords, renamed
from ..cells import h5_keys as _h5_keys
from .classifier import CellTypeClassifier
from .objectives import (CellTypeObjective, GeneExpressionObjective, MarkerGeneObjective, NonNegativityObjective,
                         ObjectiveFunction, RealismObjective, SparsityObjective, SuppressedGeneObjective)
from .screen import candidate_conditions, condition_label, screen_perturbations
from .sources import decoding_condition, source_cells
from .targets import PhenotypeTarget, constraint_hits, gene_index, met_every_target


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
    var: pd.DataFrame | None = None  # the genes' var (symbols beside IDs), else names only
    ancestors: np.ndarray | None = None  # per cell, the batch row (starting noise or source cell) it descends from
    label_types: dict = field(default_factory=dict)  # the type of each covariate's training column (DataSpec's)

    @property
    def all_met(self) -> np.ndarray:
        return met_every_target(self.met, len(self.expression))

    def to_anndata(self):
        """The designed cells as an AnnData: per target ``obs['met_<target>']`` (a ``/`` in a label,
        such as ``cell_type=CD8+/CD45RA+``, written as ``_``: HDF5 reads ``/`` as a path), ``met_all``,
        ``objective``, the condition labels; ``layers['source']``; ``uns['scidiff_design']``."""
        obs = pd.DataFrame({f"met_{k}".replace("/", "_"): v for k, v in self.met.items()},
                           index=[f"designed_{i}" for i in range(len(self.expression))])
        obs["met_all"] = self.all_met
        obs["objective"] = self.loss
        for k, v in self.condition.items():  # a boolean or integer covariate's labels as the training column held them
            labels = [str(s) for s in v] if isinstance(v, list) else [str(v)] * len(obs)
            obs[k] = typed_labels(labels, self.label_types.get(k))
        out = ad.AnnData(X=self.expression.astype(np.float32), obs=obs)
        out.var_names = list(self.gene_names)
        if self.var is not None:
            out.var = self.var.reindex(out.var_names)
        if self.source is not None:
            out.layers["source"] = self.source.astype(np.float32)
        out.uns["log1p"] = scanpy_log1p()  # X is log1p, as scanpy records it
        out.uns["scidiff_design"] = _h5_keys({"target": _jsonable(self.target.to_dict()),
                                              "settings": _jsonable(self.settings)})
        return out


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


class InverseDesigner:
    """Design cells that meet a :class:`PhenotypeTarget` by guided sampling from ``model``.

    ``objectives``: :class:`ObjectiveFunction` instances or callables ``(expression, target,
    cond) -> [B]``; by default the gene objectives (levels, markers up, suppressed down) plus a
    :class:`CellTypeObjective` when ``classifier`` is given. Constraint terms are added by weight:
    ``nonnegativity_weight`` (on by default), ``sparsity_weight`` (L1 pull of genes below
    ``sparsity_threshold`` to 0) and ``realism_weight`` (:class:`RealismObjective`).

    ``observed``: design measured cells (the default, ``None``, where the model has a fitted
    detection model, as generation does: :meth:`scidiff.models.ScIDiffModel.resolve_observed`;
    ``False`` designs smooth expression). Guidance works on each cell's smooth expression (the
    model's output, differentiable); the designed cell, the targets' check (for retries and the
    screen) and the report then use a measurement of it through the model's detection model
    (:meth:`scidiff.models.ScIDiffModel.observe`: sparse, with the data's detection rates and
    levels), which is what real cells are compared with; by default the target genes are
    measured within their targets (``design(condition_measurement=...)``).
    """

    def __init__(self, model, objectives=None, *, classifier: CellTypeClassifier | None = None,
                 nonnegativity_weight: float = 1.0, sparsity_weight: float = 0.0, sparsity_threshold: float = 0.1,
                 realism_weight: float = 0.0, realism_t: int | None = None, observed: bool | None = None):
        if getattr(model, "data_spec", None) is None:
            raise ValueError("inverse design needs a model with a gene list (train it through scidiff.setup_anndata)")
        observed = yes_no("observed", observed, OBSERVED)  # 'no' designed measured cells
        detection = getattr(model, "detection", None)
        if observed and (detection is None or not bool(detection.fitted)):
            raise ValueError("observed=True needs a principal-axes model with a fitted detection model "
                             "(model.fit_detection(cells); ScIDiffModel.from_data fits it)")
        if observed is None:
            observed = model.resolve_observed() if hasattr(model, "resolve_observed") else False
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
        target.check_in(self.model.data_spec)
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

    def guided_denoiser(self, target: PhenotypeTarget, *, objective_scale: float | None = None, schedule=(0.2, 0.7),
                        normalize: bool = False, backward_steps: int = 0, max_step: float | None = None,
                        cfg_scale: float = 1.0, null_cond: dict | None = None, alphas_cumprod=None,
                        **deprecated) -> Denoiser:
        """The model wrapped by classifier-free guidance (``cfg_scale != 1``, against
        ``null_cond``) and then by :func:`~scidiff.diffusion.guidance.objective_guidance` toward
        ``target`` with strength ``objective_scale`` (default 10; ``guidance_scale=`` is its
        deprecated name here)."""
        (objective_scale,) = renamed("InverseDesigner.guided_denoiser", deprecated,
                                     {"guidance_scale": ("objective_scale", objective_scale)})
        no_other_keywords("InverseDesigner.guided_denoiser", deprecated)
        objective_scale = 10.0 if objective_scale is None else objective_scale
        self.check(target)
        base = self.model
        if cfg_scale != 1.0:
            base = classifier_free_guidance(self.model, cfg_scale, null_cond)
        ab = self.model.scheduler if alphas_cumprod is None else alphas_cumprod
        return objective_guidance(base, self.loss_fn(target), ab, to_expression=self.to_expression,
                                  scale=objective_scale, scale_schedule=schedule, normalize=normalize,
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
        :func:`~scidiff.tasks.design.screen.screen_perturbations`: counterfactuals of ``source``, else
        cells from the same noise) and ``p(c)`` the value's share of the training cells
        (:meth:`scidiff.data.DataSpec.condition_prior`). Returns a table with the columns
        ``condition`` (a dict), ``label``, ``prior``, ``fraction_met``, ``posterior``, in
        candidate order."""
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
                             "each: raise screen_cells (--screen-cells), or design without select")
        return pd.DataFrame({"condition": candidates, "label": [condition_label(c) for c in candidates],
                             "prior": prior / prior.sum(), "fraction_met": rate, "posterior": joint / joint.sum()})

    @staticmethod
    def _selected_condition(table, num_samples: int, seed: int | None = 0) -> tuple[dict, dict]:
        """Cells per condition in proportion to the posterior (:func:`scidiff.groups.share_out`,
        rounded from ``seed``), as per-cell label lists ``{key: [...]}`` and the counts per
        condition label."""
        counts = share_out(num_samples, table["posterior"].to_numpy(), seed)
        cells: dict[str, list] = {}
        keys = list(dict.fromkeys(k for c in table["condition"] for k in c))
        for cond, k in zip(table["condition"], counts):
            for key in keys:
                cells.setdefault(key, []).extend([cond.get(key, float("nan"))] * int(k))
        return cells, {label: int(k) for label, k in zip(table["label"], counts) if k}

    @torch.no_grad()
    def design(self, target: PhenotypeTarget, n: int | None = None, *, source=None, condition: dict | None = None,
               sampler: str = "ddim", steps: int = 50, eta: float | None = None, objective_scale: float | None = None,
               schedule=(0.2, 0.7), normalize: bool = False, backward_steps: int = 0, max_step: float | None = None,
               cfg_scale: float = 1.0, strength: float = 1.0, resample: bool | None = None, resample_every: int = 2,
               resample_until: float = 0.8, sharpness: float = 4.0, zero_below: float | None = None,
               select: str | None = None, screen_cells: int = 128, retries: int = 0, retry_noise: float = 0.7,
               condition_measurement: bool = True, reweight_measurement: bool = False, seed: int = 0,
               batch_size: int = 1024,
               record_path: bool = False, progress: bool = False, **deprecated) -> DesignResult:
        """Generate ``n`` cells (default 32) meeting ``target``.

        ``source``: cells to start from (an AnnData in the data's genes, a
        :class:`scidiff.data.CellData`, or model-space rows); each is inverted by DDIM under its
        own condition up to ``strength * T`` (1 = pure noise level, smaller keeps more of the
        source, as SDEdit, Meng et al. 2022) and decoded with guidance; without a source, cells
        start from noise. ``condition``: labels to decode under (default: the source's own
        covariates with perturbations at null). ``objective_scale`` (default 10; the deprecated
        ``guidance_scale=`` here), ``schedule``, ``normalize``, ``backward_steps``, ``max_step``:
        see :func:`~scidiff.diffusion.guidance.objective_guidance`; ``cfg_scale``: classifier-free
        guidance on the condition (``guidance_scale`` in :func:`scidiff.design`). ``num_samples=``:
        the deprecated name of ``n``.

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
        num_samples, objective_scale = renamed("InverseDesigner.design", deprecated, {
            "num_samples": ("n", n), "guidance_scale": ("objective_scale", objective_scale)})
        no_other_keywords("InverseDesigner.design", deprecated)
        normalize, condition_measurement, reweight_measurement, record_path, progress = (  # 'no' read as true
            yes_no(name, value) for name, value in (
                ("normalize", normalize), ("condition_measurement", condition_measurement),
                ("reweight_measurement", reweight_measurement), ("record_path", record_path), ("progress", progress)))
        resample = yes_no("resample", resample, "on without a source")
        seed = check_seed(seed)  # numpy's generator and torch's both draw from it (-1 or None: a named error)
        # int() read n=True as 1 cell and 8.7 as 8, retries=True as 1; 5.0 steps failed in range()
        num_samples = 32 if num_samples is None else whole_number("n", num_samples, what="an integer",
                                                                   integral_floats=False)
        steps = whole_number("steps", steps, what="an integer")
        retries = whole_number("retries", retries, what="an integer")
        if condition is not None:  # 'B' was refused as "conditioning", a name design does not take
            condition = condition_mapping(condition)
        objective_scale = 10.0 if objective_scale is None else real_number(  # float() read True as 1
            "objective_scale", objective_scale, what="a finite number (0: no pull toward the target)")
        self.check(target)
        if num_samples < 1:
            raise ValueError(f"n must be >= 1, got {num_samples}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if int(retries) < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if select is not None and condition and select in condition:
            raise ValueError(f"select={select!r} (--select) draws {select!r} per cell, but condition (--condition) "
                             f"fixes it to {condition[select]!r}: give one or the other")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        resample = (source is None) if resample is None else bool(resample)
        if resample and resample_every < 1:
            raise ValueError(f"resample_every must be >= 1, got {resample_every}")
        eta = (1.0 if resample else 0.0) if eta is None else float(eta)
        model, spec = self.model, self.model.data_spec
        device = next(model.parameters()).device
        rng = np.random.default_rng(seed)
        src_x, src_codes = source_cells(model, source, num_samples, rng)
        cond_all = decoding_condition(model, condition, src_codes, num_samples)
        selection, screen_steps = None, 0
        if select is not None:
            table = self.condition_posterior(target, select, source, condition=condition, n_cells=screen_cells,
                                             steps=steps, seed=seed)
            screen_steps = (len(table) + (source is not None)) * screen_cells * steps  # decodings (+ inversion)
            cells, per_condition = self._selected_condition(table, num_samples, seed)
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
                denoiser = self.guided_denoiser(target, objective_scale=objective_scale, schedule=schedule,
                                                normalize=normalize, backward_steps=backward_steps, max_step=max_step,
                                                cfg_scale=cfg_scale, null_cond=null, alphas_cumprod=ab)
                prior = model if cfg_scale == 1.0 else classifier_free_guidance(model, cfg_scale, null)
                potential = None if log_g is None else (lambda x0, c: log_g(self.to_expression(x0), c))
                z, idx, rec, k = walk_smc(denoiser, x_T, plan, cond, gen, potential,
                                          resample_every if resample else 0, int(resample_until * len(plan)),
                                          record_path, progress, prior=prior, desc="designing")
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
                        eta, gen, zero_below, dict(objective_scale=objective_scale, schedule=schedule,
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
        settings = {"n": num_samples, "sampler": sampler, "steps": n_steps, "eta": eta,
                    "objective_scale": objective_scale,
                    "schedule": (schedule if isinstance(schedule, (str, tuple, list))
                                 else getattr(schedule, "__name__", "custom")),
                    "normalize": normalize, "backward_steps": backward_steps, "max_step": max_step,
                    "guidance_scale": cfg_scale, "strength": strength, "resample": resample,
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
                            var=spec.var_frame(training_columns=True), label_types=spec.label_types,
                            met=self.hits(expr, target), loss=loss.cpu().numpy(),
                            source=source_expr, condition=labels, settings=settings,
                            path=torch.cat(paths, dim=1) if record_path else None, ancestors=ancestry.numpy())


def design(model, target, n: int | None = None, *, condition: dict | None = None, source=None, sampler: str = "ddim",
           steps: int = 50, guidance_scale: float | None = None, objective_scale: float = 10.0, seed: int = 0,
           progress: bool = False, classifier: CellTypeClassifier | None = None, observed: bool | None = None,
           retries: int = 2, **options) -> ad.AnnData:
    """Design ``n`` cells (default 256) toward ``target`` (a :class:`PhenotypeTarget` or its text,
    ``"IL2RA>=5,FOXP3>=4,CD8A<=0.1"``) with ``model``; returns them as an AnnData (per-target hits
    in ``obs``, the source cells in ``layers['source']`` when there are some, the settings in
    ``uns['scidiff_design']``).

    ``condition``: labels to decode under; ``source``: cells to start from; ``sampler``, ``steps``,
    ``seed``, ``progress`` as in every verb; ``guidance_scale``: classifier-free guidance on the
    condition (default 1); ``objective_scale``: the strength of the pull toward the target;
    ``retries``: restarts of the cells that miss it (default 2, as on the command line; 0 keeps the
    first draw). ``classifier``, ``observed``: see :class:`InverseDesigner`; other ``options`` (``eta``,
    ``select``, ``schedule``, ...) go to :meth:`InverseDesigner.design`.
    ``num_samples=`` and ``cfg_scale=`` are deprecated names of ``n`` and ``guidance_scale``."""
    n, guidance_scale = renamed("scidiff.design", options, {"num_samples": ("n", n),
                                                            "cfg_scale": ("guidance_scale", guidance_scale)})
    if not isinstance(target, PhenotypeTarget):
        target = PhenotypeTarget.parse(target)
    designer = InverseDesigner(model, classifier=classifier, observed=observed)
    result = designer.design(target, 256 if n is None else n, condition=condition, source=source, sampler=sampler,
                             steps=steps, objective_scale=objective_scale,
                             cfg_scale=1.0 if guidance_scale is None else guidance_scale, seed=seed, progress=progress,
                             retries=retries, **options)
    return result.to_anndata()
