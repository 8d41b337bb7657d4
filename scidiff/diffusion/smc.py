"""Sequential Monte Carlo over a batch walking a sampler plan: Feynman-Kac steering (Singhal et
al. 2025; twisted SMC, Wu et al. 2023). Each cell is weighted by the change of a log-potential on
the unguided prior's prediction (difference potentials, which telescope to ``G`` of the final
cell), and the batch is resampled systematically (Kitagawa 1996) when the effective sample size
drops below half. It is the plain walker (:func:`~scidiff.diffusion.plans.walk`) with a hook."""
from __future__ import annotations

import torch

from .plans import walk
from .samplers import noise_source, timestep_tensor


def systematic_resample(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices drawn by systematic resampling (Kitagawa 1996): one uniform offset, ``N`` evenly
    spaced points on the cumulative weights."""
    n = weights.shape[0]
    u = (torch.rand((), generator=generator, device=weights.device) + torch.arange(n, device=weights.device)) / n
    cdf = torch.cumsum(weights / weights.sum(), 0)
    return torch.searchsorted(cdf, u.to(cdf.dtype)).clamp_max(n - 1)


def walk_smc(denoiser, x_T, plan, cond: dict, generator, potential, every: int, until: int, record: bool = False,
             progress: bool = False, prior=None, desc: str = "sampling"):
    """Walk ``plan`` with ``denoiser`` (noise from ``generator``), resampling every ``every``
    steps before step ``until`` by the change of ``potential(x0, cond) -> log G [B]`` on the
    ``prior`` denoiser's prediction (default ``denoiser``): the prior's, not the guided prediction,
    since guidance would make every cell look on target and leave nothing to select.
    ``every = 0``: no resampling. Returns ``(x, ancestor index per row, recorded x0 path
    [steps, B, D] or None, resamplings)``."""
    n = x_T.shape[0]
    ctx = {"cond": cond, "ancestry": torch.arange(n, device=x_T.device), "logw": torch.zeros(n, device=x_T.device),
           "last": torch.zeros(n, device=x_T.device), "rec": [], "events": 0}

    def predict(x_in, t, i):
        return denoiser(x_in, timestep_tensor(t, x_in), ctx["cond"])

    def hook(i, st, state, x_in, x0):
        if record:
            ctx["rec"].append(x0.detach().cpu())
        if not (every and not st.to_mid and (i + 1) % every == 0 and i + 1 < until):
            return
        x0_prior = (prior or denoiser)(x_in, timestep_tensor(st.t, x_in), ctx["cond"])
        pot = potential(x0_prior, ctx["cond"]).float()
        ctx["logw"] = ctx["logw"] + pot - ctx["last"]
        ctx["last"] = pot
        w = torch.softmax(ctx["logw"], 0)
        if float(1.0 / (w ** 2).sum()) < n / 2:
            idx = systematic_resample(w, generator)
            state.x, state.prev = state.x[idx], state.prev[idx]
            ctx["last"], ctx["ancestry"] = ctx["last"][idx], ctx["ancestry"][idx]
            ctx["cond"] = {k: (v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v)[idx]
                           for k, v in ctx["cond"].items()}
            ctx["rec"] = [r[idx.cpu()] for r in ctx["rec"]]
            ctx["logw"] = torch.zeros(n, device=state.x.device)
            ctx["events"] += 1

    x = walk(plan, x_T, predict, noise=noise_source(None, generator), hook=hook, progress=progress, desc=desc)
    return x, ctx["ancestry"], (torch.stack(ctx["rec"]) if record else None), ctx["events"]
