"""Samplers as plain functions over a denoiser (the design's sampler seam).

A denoiser is ``denoiser(x_t, t, cond) -> x0_hat``: it returns the predicted clean sample for
noisy ``x_t [B, G]`` at integer timesteps ``t [B]``. A schedule is anything with
``alphas_cumprod`` (float64, length T) or that tensor itself. All step coefficients are computed
before the loop as Python floats, so the loop has no tensor comparisons or host syncs; all noise
can be passed in (``noise[i]`` is used at step ``i``) for exact reproducibility.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict | None], torch.Tensor]


def alphas_cumprod_of(schedule) -> list[float]:
    ab = getattr(schedule, "alphas_cumprod", schedule)
    return [float(v) for v in torch.as_tensor(ab, dtype=torch.float64)]


def timesteps(num_timesteps: int, steps: int | None) -> list[int]:
    """``steps`` timesteps evenly spaced over ``[0, T-1]``, descending, always from ``T-1`` to 0
    ("trailing" spacing, Lin et al. 2024), so few-step sampling starts from pure noise."""
    if steps is None or steps >= num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    ts = [round(i * (num_timesteps - 1) / (steps - 1)) for i in range(steps)]
    return sorted(set(ts), reverse=True)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Noise implied by ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``."""
    return (x_t - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)


def ddim_coefficients(ab: list[float], ts: list[int], eta: float = 0.0) -> list[tuple]:
    """Per step ``(t, c_x0, c_eps, sigma)`` of ``x_s = c_x0 x0 + c_eps eps + sigma z`` (Song et
    al. 2021, eq. 12); the step after the last timestep lands on clean data (``ab = 1``)."""
    coefs = []
    for i, t in enumerate(ts):
        a_t = ab[t]
        a_s = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) if a_s < 1.0 else 0.0
        c_eps = math.sqrt(max(1 - a_s - sigma**2, 0.0))
        coefs.append((t, math.sqrt(a_s), c_eps, sigma))
    return coefs


def _noise_at(noise, i, like, generator):
    if noise is not None:
        return noise[i].to(like)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _t(t: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), t, dtype=torch.long, device=like.device)


@torch.no_grad()
def ddim(denoiser: Denoiser, x_T: torch.Tensor, schedule, steps: int | None = 50, *, eta: float = 0.0,
         cond: dict | None = None, noise=None, generator: torch.Generator | None = None,
         clip: tuple[float, float] | None = None, callback=None, progress: bool = False) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021). ``eta=0`` is the deterministic probability-flow
    sampler; ``eta=1`` equals DDPM's ancestral step on the same timestep grid."""
    ab = alphas_cumprod_of(schedule)
    coefs = ddim_coefficients(ab, timesteps(len(ab), steps), eta)
    x = x_T
    it = _progress(coefs, progress, "DDIM")
    for i, (t, c_x0, c_eps, sigma) in enumerate(it):
        x0 = denoiser(x, _t(t, x), cond)
        if clip is not None:
            x0 = x0.clamp(*clip)
        eps = eps_from_x0(x, x0, ab[t])
        x = c_x0 * x0 + c_eps * eps
        if sigma > 0:
            x = x + sigma * _noise_at(noise, i, x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def ddpm(denoiser: Denoiser, x_T: torch.Tensor, schedule, steps: int | None = None, *,
         cond: dict | None = None, noise=None, generator: torch.Generator | None = None,
         clip: tuple[float, float] | None = None, callback=None, progress: bool = False) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) from the posterior
    ``q(x_s | x_t, x0_hat)``; ``steps=None`` walks all T timesteps, fewer respaces them
    (Nichol & Dhariwal 2021)."""
    ab = alphas_cumprod_of(schedule)
    ts = timesteps(len(ab), steps)
    coefs = []
    for i, t in enumerate(ts):
        a_t, a_s = ab[t], (ab[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        beta = 1.0 - a_t / a_s
        coefs.append((t, math.sqrt(a_s) * beta / (1 - a_t), math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t),
                      math.sqrt((1 - a_s) / (1 - a_t) * beta)))
    x = x_T
    for i, (t, c_x0, c_xt, sigma) in enumerate(_progress(coefs, progress, "DDPM")):
        x0 = denoiser(x, _t(t, x), cond)
        if clip is not None:
            x0 = x0.clamp(*clip)
        x = c_x0 * x0 + c_xt * x
        if sigma > 0:
            x = x + sigma * _noise_at(noise, i, x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, x0: torch.Tensor, schedule, steps: int | None = 50, *,
                cond: dict | None = None, progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM inversion: clean ``x0`` -> ``x_T`` up the grid that :func:`ddim` walks
    down, so ``ddim(ddim_invert(x0)) ~= x0`` (Song et al. 2021, sec. 4.3; Dhariwal & Nichol 2021,
    app. F). Each step from level ``s`` to ``t`` reads the noise direction from the denoiser at
    ``(x_s, t)``; the round-trip error is first order in the step size."""
    ab = alphas_cumprod_of(schedule)
    x, a_s = x0, 1.0
    for t in _progress(timesteps(len(ab), steps)[::-1], progress, "DDIM inversion"):
        eps = eps_from_x0(x, denoiser(x, _t(t, x), cond), ab[t])
        x0_s = (x - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s)
        x = math.sqrt(ab[t]) * x0_s + math.sqrt(1 - ab[t]) * eps
        a_s = ab[t]
    return x


SAMPLERS = {"ddim": ddim, "ddpm": ddpm}


def _progress(seq, enabled: bool, desc: str):
    if not enabled:
        return seq
    from tqdm.auto import tqdm

    return tqdm(seq, desc=desc, leave=False)
