"""Where generation stops: the noise level at which a trained model stops generalising.

A diffusion model trained on a few thousand cells learns, at low noise, to pull a noisy cell
toward the training cells it has seen (the denoiser recovers training cells better than new
ones), so the last steps of the reverse process draw generated cells toward training cells:
on Kang (800 epochs) generated cells lay a median 3.44 from the nearest training cell of their
group in the latent, held-out real cells 4.24, and three times the training made it 1.95. A model of the
population should generate cells that lie as far from the training cells as new real cells do:
the distance to the closest training record (DCR) used to audit synthetic data for memorisation.

:func:`fit_final_sigma` chooses the noise level ``final_sigma`` at which the walk ends
(:func:`scidiff.diffusion.plans.sampler_plan`: the generated cell is then a draw of the model's
distribution at that noise, ``x0 + final_sigma eps``, from the noise levels where it still
generalises), by bisection, so that the median DCR of generated cells (conditioned as the
held-out cells are, common random numbers across levels) equals that of held-out cells the
model never saw. 0 where generated cells already lie no nearer than two standard errors of the
held-out cells' median (a bootstrap over them).

Opt-in (``training.final_sigma: auto``; the default ends on clean data). Against Kang's 396
held-out cells the rule gives 0.19 for an 800-epoch model and 0.32 for a 2,400-epoch one, near
the levels that score best there (0.2 and 0.3 of a grid); but fitted on the 158 validation cells
of the packaged ``scidiff train`` (400 epochs) it chose 0.26 (the held-out cells: 0.14) and the
generated cells scored no better on held-out cells (classifier AUC 0.587 against 0.583) while
the stimulated-vs-control fold changes shrank (slope 0.884 against 0.903; ``bench/README.md``,
generation).
"""
from __future__ import annotations

import torch

from ..diffusion.plans import DEFAULT_SAMPLER, DEFAULT_STEPS

REFERENCE_CELLS = 20_000  # training cells the distances are measured to, at most
HELD_OUT_CELLS = 2_000    # held-out cells (and as many generated) the medians are taken over, at most
MOST = 1.0                # the highest level tried (the diffusion space's data scale is 1)
ITERATIONS = 10           # bisection steps: to within MOST / 1024


def nearest_distance(cells: torch.Tensor, reference: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Each row of ``cells``'s Euclidean distance to its nearest row of ``reference``."""
    return torch.cat([torch.cdist(cells[i:i + chunk], reference).min(1).values for i in range(0, len(cells), chunk)])


def _subset(n: int, most: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[:most] if n > most else torch.arange(n)


@torch.no_grad()
def fit_final_sigma(model, training: torch.Tensor, held_out: torch.Tensor, conditioning: dict | None = None, *,
                    sampler: str | None = None, steps: int | None = None, seed: int = 0,
                    iterations: int = ITERATIONS, most: float = MOST) -> float:
    """The noise level (module docstring) for ``model``, from ``training`` and ``held_out`` cells
    in model space ``[N, G]``; ``conditioning``: the held-out cells' conditions (per cell, as
    the training loader gives them; ``None`` for an unconditional model). The default sampler
    and steps (``sampler``, ``steps``) generate; ``seed`` fixes the subsets and the draws."""
    if len(held_out) < 2 or len(training) < 2:
        raise ValueError(f"fitting the final noise level needs training and held-out cells, got {len(training)} "
                         f"and {len(held_out)}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    keep = _subset(len(held_out), HELD_OUT_CELLS, g)
    reference = model.encode(training[_subset(len(training), REFERENCE_CELLS, g)].to(device).float())
    new = model.encode(held_out[keep].to(device).float())
    cond = {k: v[keep.to(v.device)] for k, v in (conditioning or {}).items()}
    held_distance = nearest_distance(new, reference)
    target = float(held_distance.median())
    # the held-out median's standard error (bootstrap): a model within two of it is left as it is
    boot = torch.randint(0, len(held_distance), (200, len(held_distance)), generator=g)
    spread = 2.0 * float(held_distance.cpu()[boot].median(1).values.std())

    def generated_distance(sigma: float) -> float:
        cells = model.sample(len(keep), cond or None, sampler=sampler or DEFAULT_SAMPLER, steps=steps or DEFAULT_STEPS,
                             seed=seed, return_expression=False, final_sigma=sigma, device=device)
        return float(nearest_distance(model.encode(cells).to(reference), reference).median())

    if generated_distance(0.0) >= target - spread:
        return 0.0
    if generated_distance(most) <= target:
        return float(most)
    lo, hi = 0.0, float(most)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if generated_distance(mid) < target else (lo, mid)
    return (lo + hi) / 2
