"""One batched sampler update: the pure-torch reference, the ``scidiff::sampler_step`` custom op
around the Triton kernel (``kernels/sampler_step.py``), and the dispatching call.

    x0  = clamp(u + w (c - u))            (or clamp(c) without an unconditional prediction)
    out = a x + b x0 + p x0_prev + s z    (per-row coefficients ``coef = [a, b, p, s]``)

Every sampler in :mod:`scidiff.diffusion.samplers` is a sequence of such updates
(:class:`~scidiff.diffusion.plans.PlanStep`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import load_kernel, use_triton

NOISE_KEY_STRIDE = 1000003  # the step offset's weight in the noise seed (same constant as the kernel)


def sampler_step_reference(x: Tensor, pred: Tensor, pred_uncond: Optional[Tensor], prev: Optional[Tensor],
                           coef: Tensor, guidance: float = 1.0, clamp_min: Optional[float] = None,
                           clamp_max: Optional[float] = None, noise: Optional[Tensor] = None,
                           seed: Optional[Tensor] = None, offset: int = 0) -> tuple[Tensor, Tensor]:
    """``(x_next, x0)``: guidance combine, clamp, then ``a x + b x0 + p x0_prev + s z`` with
    ``coef [B, 4]`` (or ``[4]``, shared by all rows). ``z`` is ``noise`` if given, else drawn
    from ``torch.Generator().manual_seed(seed + offset * 1000003)`` if ``seed`` is given."""
    coef = coef.reshape(-1, 4).to(device=x.device, dtype=x.dtype)
    ca, cb, cp, cs = (c.unsqueeze(-1) for c in coef.unbind(-1))
    x0 = pred if pred_uncond is None else pred_uncond + guidance * (pred - pred_uncond)
    x0 = x0.to(x.dtype)
    if clamp_min is not None or clamp_max is not None:
        x0 = x0.clamp(clamp_min, clamp_max)
    out = ca * x + cb * x0
    if prev is not None:
        out = out + cp * prev
    if noise is None and seed is not None:
        gen = torch.Generator(device=x.device).manual_seed(int(seed.reshape(-1)[0]) + offset * NOISE_KEY_STRIDE)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    if noise is not None:
        out = out + cs * noise
    return out, x0


@torch.library.custom_op("scidiff::sampler_step", mutates_args=())
def _step_op(x: Tensor, pred: Tensor, pred_uncond: Optional[Tensor], prev: Optional[Tensor], coef: Tensor,
             guidance: float, clamp_min: Optional[float], clamp_max: Optional[float], noise: Optional[Tensor],
             seed: Optional[Tensor], offset: int) -> tuple[Tensor, Tensor]:
    return load_kernel("sampler_step").sampler_step(x, pred, pred_uncond, prev, coef, guidance, clamp_min, clamp_max,
                                                    noise, seed, offset)


@_step_op.register_fake
def _step_fake(x, pred, pred_uncond, prev, coef, guidance, clamp_min, clamp_max, noise, seed, offset):
    return torch.empty_like(x), torch.empty_like(x)


def sampler_step(x: Tensor, pred: Tensor, pred_uncond: Optional[Tensor] = None, prev: Optional[Tensor] = None,
                 coef: Tensor | None = None, guidance: float = 1.0, clamp_min: Optional[float] = None,
                 clamp_max: Optional[float] = None, noise: Optional[Tensor] = None, seed: Optional[Tensor] = None,
                 offset: int = 0) -> tuple[Tensor, Tensor]:
    """The update through the Triton kernel where it runs (see :mod:`scidiff.ops.dispatch`), else
    the reference; same arguments as :func:`sampler_step_reference`."""
    if coef is None:
        raise ValueError("sampler_step needs the coefficients coef=[a, b, p, s]")
    if use_triton(x):
        return torch.ops.scidiff.sampler_step(x, pred, pred_uncond, prev, coef, float(guidance), clamp_min, clamp_max,
                                              noise, seed, int(offset))
    return sampler_step_reference(x, pred, pred_uncond, prev, coef, guidance, clamp_min, clamp_max, noise, seed,
                                  offset)
