"""Guidance as denoiser wrappers: each takes a denoiser and returns one (the design's guidance seam).

- :func:`classifier_free_guidance`: ``u + w (c - u)`` over the conditional and null condition
  (Ho & Salimans 2022), both halves in one batched call (:func:`double_rows`, :func:`cfg_combine`,
  which the engine and the ONNX graph use too; :func:`guidance_weight` checks the weight for all).
- :func:`objective_guidance`: universal guidance (Bansal et al. 2023) toward a differentiable
  per-cell objective, with guidance-scale schedules (:data:`SCHEDULES`, :func:`guidance_interval`)
  and Polyak steps (:func:`polyak_step`) for backward guidance.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .plans import alphas_cumprod_of
from .samplers import Denoiser


def double_rows(cond: dict, null: dict, b: int) -> dict:
    """The ``2b`` rows classifier-free guidance evaluates: ``cond``'s ``b`` rows, then ``null``'s
    (each covariate broadcast to ``b`` rows); every key must be in both."""
    both = {}
    for k in dict.fromkeys([*cond, *null]):
        c, u = cond.get(k), null.get(k)
        if c is None or u is None:
            raise ValueError(f"classifier-free guidance needs condition {k!r} in both the "
                             "condition and the null condition")
        both[k] = torch.cat([c.expand(b, *c.shape[1:]), u.expand(b, *u.shape[1:])])
    return both


def cfg_combine(cond_out, uncond_out, w):
    """``u + w (c - u)``: the guided prediction from the conditional and unconditional ones."""
    return uncond_out + w * (cond_out - uncond_out)


def guidance_weight(guidance_scale) -> float:
    """The classifier-free guidance weight as a float, refused (naming it) unless a finite number:
    a NaN or infinite weight makes every cell NaN."""
    try:
        w = math.nan if isinstance(guidance_scale, (bool, str, bytes)) else float(guidance_scale)
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w):
        raise ValueError(f"guidance_scale must be a finite number (1 = no guidance), got {guidance_scale!r}")
    return w


def classifier_free_guidance(denoiser: Denoiser, guidance_scale: float, null_cond: dict | None = None) -> Denoiser:
    """``u + w (c - u)`` with ``c`` the conditional and ``u`` the unconditional prediction
    (Ho & Salimans 2022). ``w = 1`` is the plain conditional model, ``w = 0`` unconditional.
    Both halves run in one batched call. Predictions are x0 here; the combine is linear, so it
    equals the same combine on eps."""
    w = guidance_weight(guidance_scale)
    if w == 1.0:
        return denoiser

    def guided(x: torch.Tensor, t: torch.Tensor, cond: dict | None) -> torch.Tensor:
        b = x.shape[0]
        out = denoiser(torch.cat([x, x]), torch.cat([t, t]), double_rows(cond or {}, null_cond or {}, b))
        return cfg_combine(out[:b], out[b:], w)

    return guided


# -- objective guidance --------------------------------------------------------------------------------------

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


def schedule_fn(scale_schedule, num_timesteps: int) -> Callable[[int, float], float]:
    if isinstance(scale_schedule, (tuple, list)) and len(scale_schedule) == 2:
        return guidance_interval(float(scale_schedule[0]), float(scale_schedule[1]), num_timesteps)
    if callable(scale_schedule):
        return scale_schedule
    if scale_schedule not in SCHEDULES:
        raise ValueError(f"unknown guidance schedule {scale_schedule!r}; choose one of {sorted(SCHEDULES)}, an "
                         "interval (low, high) of t / T, or a function (t, alpha_bar) -> weight")
    return SCHEDULES[scale_schedule]


def polyak_step(loss: torch.Tensor, grad: torch.Tensor, max_step: float | None) -> torch.Tensor:
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
    weight = schedule_fn(scale_schedule, len(ab))
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
                x0 = x0.detach() - w * polyak_step(loss.detach(), grad, max_step)
        return x0.detach()

    return guided
