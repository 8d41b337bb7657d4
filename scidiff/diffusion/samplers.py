"""Samplers as plain functions over a denoiser (the design's sampler seam).

A denoiser is ``denoiser(x_t, t, cond) -> x0_hat``: it returns the predicted clean sample for
noisy ``x_t [B, G]`` at integer timesteps ``t [B]``. A schedule is anything with
``alphas_cumprod`` (float64, length T) or that tensor itself. Every sampler is a plan
(:mod:`scidiff.diffusion.plans`: all step coefficients computed before the loop as Python
floats, so the loop has no tensor comparisons or host syncs) walked by the one walker
(:func:`~scidiff.diffusion.plans.walk`); all noise can be passed in (``noise[i]`` is used at plan
step ``i``) for exact reproducibility.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .plans import (DEFAULT_STEPS, PlanStep, _progress, alphas_cumprod_of, sampler_plan,
                    timesteps, walk)

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict | None], torch.Tensor]


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Noise implied by ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``."""
    return (x_t - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)


def timestep_tensor(t: int, like: torch.Tensor) -> torch.Tensor:
    """Timestep ``t`` for every row of ``like`` (``LongTensor[B]`` on its device)."""
    return torch.full((like.shape[0],), t, dtype=torch.long, device=like.device)


def noise_source(noise=None, generator: torch.Generator | None = None):
    """``noise(i, like)`` for :func:`~scidiff.diffusion.plans.walk`: ``noise[i]`` when given, else a
    standard normal draw from ``generator``."""
    def draw(i: int, like: torch.Tensor) -> torch.Tensor:
        if noise is not None:
            return noise[i].to(like)
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    return draw


def predictor(denoiser: Denoiser, cond: dict | None, clip: tuple[float, float] | None = None):
    """``predict(x_in, t, i)`` for the walker: ``denoiser(x_in, t, cond)``, clamped to ``clip``."""
    def predict(x_in: torch.Tensor, t: int, i: int) -> torch.Tensor:
        x0 = denoiser(x_in, timestep_tensor(t, x_in), cond)
        return x0 if clip is None else x0.clamp(*clip)

    return predict


@torch.no_grad()
def run_plan(denoiser: Denoiser, x_T: torch.Tensor, plan: list[PlanStep], *, cond: dict | None = None,
             noise=None, generator: torch.Generator | None = None, clip: tuple[float, float] | None = None,
             callback=None, progress: bool = False, desc: str = "sampling") -> torch.Tensor:
    """Walk a plan with a plain denoiser. ``noise[i]`` (or a draw from ``generator``) is used at
    plan step ``i`` when that step adds noise; ``callback(i, t, out, x0)`` after each step."""
    hook = None if callback is None else (
        lambda i, st, state, x_in, x0: callback(i, st.t, state.mid if st.to_mid else state.x, x0))
    return walk(plan, x_T, predictor(denoiser, cond, clip), noise=noise_source(noise, generator), hook=hook,
                progress=progress, desc=desc)


@torch.no_grad()
def ddim(denoiser: Denoiser, x_T: torch.Tensor, schedule, steps: int | None = 50, *, eta: float = 0.0,
         cond: dict | None = None, noise=None, generator: torch.Generator | None = None,
         clip: tuple[float, float] | None = None, callback=None, progress: bool = False,
         final_sigma: float = 0.0) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021). ``eta=0`` is the deterministic probability-flow
    sampler; ``eta=1`` equals DDPM's ancestral step on the same timestep grid. ``final_sigma``:
    end at that noise level (:func:`~scidiff.diffusion.plans.sampler_plan`), as every sampler here."""
    plan = sampler_plan("ddim", schedule, steps, eta=eta, final_sigma=final_sigma)
    return run_plan(denoiser, x_T, plan, cond=cond, noise=noise,
                    generator=generator, clip=clip, callback=callback, progress=progress, desc="DDIM")


@torch.no_grad()
def ddpm(denoiser: Denoiser, x_T: torch.Tensor, schedule, steps: int | None = None, *,
         cond: dict | None = None, noise=None, generator: torch.Generator | None = None,
         clip: tuple[float, float] | None = None, callback=None, progress: bool = False,
         final_sigma: float = 0.0) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) from the posterior
    ``q(x_s | x_t, x0_hat)``; ``steps=None`` walks all T timesteps, fewer respaces them
    (Nichol & Dhariwal 2021)."""
    plan = sampler_plan("ddpm", schedule, steps, final_sigma=final_sigma)
    return run_plan(denoiser, x_T, plan, cond=cond, noise=noise,
                    generator=generator, clip=clip, callback=callback, progress=progress, desc="DDPM")


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, x0: torch.Tensor, schedule, steps: int | None = 50, *,
                cond: dict | None = None, refine: int = 1, progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM inversion: clean ``x0`` -> ``x_T`` up the grid that :func:`ddim` walks
    down, so ``ddim(ddim_invert(x0)) ~= x0`` (Song et al. 2021, sec. 4.3).

    The exact inverse of a DDIM step from ``t`` down to ``s`` needs the noise direction at the
    unknown ``x_t``. Plain inversion reads it at ``(x_s, t)`` (first order in the step size);
    each of ``refine`` fixed-point iterations re-reads it at the current estimate of ``x_t``,
    which converges to the implicit solution because a small step barely changes the noise
    coefficient (as in exact-inversion schemes, e.g. Pan et al. 2023)."""
    ab = alphas_cumprod_of(schedule)
    x, a_s = x0, 1.0
    for t in _progress(timesteps(len(ab), steps)[::-1], progress, "DDIM inversion"):
        a_t = ab[t]
        x_t = x
        for _ in range(1 + refine):
            eps = eps_from_x0(x_t, denoiser(x_t, timestep_tensor(t, x), cond), a_t)
            x0_s = (x - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s)
            x_t = math.sqrt(a_t) * x0_s + math.sqrt(1 - a_t) * eps
        x, a_s = x_t, a_t
    return x


@torch.no_grad()
def dpmpp_2m(denoiser: Denoiser, x_T: torch.Tensor, schedule, steps: int | None = DEFAULT_STEPS, *,
             cond: dict | None = None, clip: tuple[float, float] | None = None, callback=None, progress: bool = False,
             noise=None, generator: torch.Generator | None = None, final_sigma: float = 0.0) -> torch.Tensor:
    """DPM-Solver++(2M), deterministic second-order multistep (Lu et al. 2022); see
    :func:`~scidiff.diffusion.plans.dpmpp_2m_plan`. ``noise`` and ``generator`` are accepted and
    unused (no noise)."""
    plan = sampler_plan("dpmpp_2m", schedule, steps, final_sigma=final_sigma)
    return run_plan(denoiser, x_T, plan, cond=cond, clip=clip,
                    callback=callback, progress=progress, desc="DPM-Solver++(2M)")


@torch.no_grad()
def euler_maruyama(denoiser: Denoiser, x_T: torch.Tensor, schedule, steps: int | None = None, *,
                   cond: dict | None = None, noise=None, generator: torch.Generator | None = None,
                   clip: tuple[float, float] | None = None, callback=None, progress: bool = False,
                   final_sigma: float = 0.0) -> torch.Tensor:
    """Reverse-time VP SDE by Euler-Maruyama (Song et al. 2021); see
    :func:`~scidiff.diffusion.plans.euler_maruyama_plan`. First order and stochastic: it needs many
    steps (``steps=None`` walks all T)."""
    plan = sampler_plan("euler_maruyama", schedule, steps, final_sigma=final_sigma)
    return run_plan(denoiser, x_T, plan, cond=cond, noise=noise,
                    generator=generator, clip=clip, callback=callback, progress=progress,
                    desc="reverse SDE (Euler-Maruyama)")


@torch.no_grad()
def heun(denoiser: Denoiser, x_T: torch.Tensor, schedule, steps: int | None = DEFAULT_STEPS, *,
         cond: dict | None = None, clip: tuple[float, float] | None = None, callback=None, progress: bool = False,
         noise=None, generator: torch.Generator | None = None, final_sigma: float = 0.0) -> torch.Tensor:
    """Probability-flow ODE by Heun's method (Karras et al. 2022); ``2 * steps - 1`` network
    evaluations; see :func:`~scidiff.diffusion.plans.heun_plan`. ``noise`` and ``generator`` are
    accepted and unused."""
    plan = sampler_plan("heun", schedule, steps, final_sigma=final_sigma)
    return run_plan(denoiser, x_T, plan, cond=cond, clip=clip,
                    callback=callback, progress=progress, desc="probability-flow ODE (Heun)")


SAMPLERS = {"ddim": ddim, "ddpm": ddpm, "dpmpp_2m": dpmpp_2m, "euler_maruyama": euler_maruyama,
            "heun": heun}
