"""One batched sampler update in a single pass over ``[B, D]`` (Triton).

    x0   = clamp(u + w (c - u))                      (classifier-free guidance, Ho & Salimans 2022)
    out  = a x + b x0 + p x0_prev + s z              (a, b, p, s per row)

DDIM, DDPM, DPM-Solver++(2M), Euler-Maruyama and Heun are all this update with different
coefficients (``scidiff.diffusion.plans.PlanStep``); rows may sit at different timesteps
because the coefficients are per row (a ``[B, 4]`` tensor, or one row broadcast with stride 0).
``z`` is either read from a tensor or drawn in the kernel: Philox (``tl.randn``) keyed by
``seed + offset * 1000003`` (``seed`` read from device memory, so a CUDA graph replays with a new
seed without recapture; ``offset`` the step index) and counted by the element's flat index.
The pure-torch reference with the same signature is
``scidiff.ops.sampler_step.sampler_step_reference``; its seeded noise comes from
``torch.Generator`` and so differs from this kernel's stream (both are exact N(0, 1) draws).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NOISE_KEY_STRIDE = 1000003  # mixes the step offset into the Philox key


@triton.jit
def _sampler_step_kernel(x_ptr, c_ptr, u_ptr, prev_ptr, coef_ptr, noise_ptr, seed_ptr, out_ptr, x0_ptr,
                         M, D, stride_x, stride_c, stride_u, stride_prev, stride_coef, stride_noise, stride_out,
                         stride_x0, guidance, clamp_lo, clamp_hi, key_offset,
                         HAS_UNCOND: tl.constexpr, HAS_PREV: tl.constexpr, NOISE: tl.constexpr,
                         CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < M
    m = rmask[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)
    ca = tl.load(coef_ptr + r64 * stride_coef + 0, mask=rmask, other=0.0).to(tl.float32)
    cb = tl.load(coef_ptr + r64 * stride_coef + 1, mask=rmask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    x0 = tl.load(c_ptr + r64[:, None] * stride_c + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(u_ptr + r64[:, None] * stride_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
        x0 = u + guidance * (x0 - u)
    if CLAMP:  # a NaN prediction stays NaN, as torch.clamp keeps it (never silently a bound)
        x0 = tl.minimum(tl.maximum(x0, clamp_lo, propagate_nan=tl.PropagateNan.ALL), clamp_hi,
                        propagate_nan=tl.PropagateNan.ALL)
    out = ca[:, None] * x + cb[:, None] * x0
    if HAS_PREV:
        cp = tl.load(coef_ptr + r64 * stride_coef + 2, mask=rmask, other=0.0).to(tl.float32)
        prev = tl.load(prev_ptr + r64[:, None] * stride_prev + cols[None, :], mask=m, other=0.0).to(tl.float32)
        out += cp[:, None] * prev
    if NOISE != 0:
        cs = tl.load(coef_ptr + r64 * stride_coef + 3, mask=rmask, other=0.0).to(tl.float32)
        if NOISE == 1:
            z = tl.load(noise_ptr + r64[:, None] * stride_noise + cols[None, :], mask=m, other=0.0).to(tl.float32)
        else:
            key = tl.load(seed_ptr) + key_offset
            z = tl.randn(key, rows[:, None] * D + cols[None, :])
        out += cs[:, None] * z
    tl.store(out_ptr + r64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(x0_ptr + r64[:, None] * stride_x0 + cols[None, :], x0.to(x0_ptr.dtype.element_ty), mask=m)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sampler_step(x: torch.Tensor, pred: torch.Tensor, pred_uncond: torch.Tensor | None, prev: torch.Tensor | None,
                 coef: torch.Tensor, guidance: float = 1.0, clamp_min: float | None = None,
                 clamp_max: float | None = None, noise: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                 offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_next, x0)`` for state ``x [B, D]``, prediction ``pred`` (and ``pred_uncond`` for
    guidance weight ``guidance``), previous prediction ``prev`` and coefficients ``coef``
    (``[B, 4]`` or ``[4]``: x, x0, x0_prev, noise). Noise from ``noise``, else from ``seed`` (an
    int64 device tensor) when the noise coefficient is used, else none."""
    if x.dim() != 2:
        raise ValueError(f"x must be [B, D], got {list(x.shape)}")
    M, D = x.shape
    if M * D >= 2**31:
        raise ValueError("the in-kernel noise counter is 32-bit: split batches above 2^31 elements")
    coef = coef.reshape(-1, 4).to(torch.float32)
    coef = coef.expand(M, 4) if coef.shape[0] == 1 else coef
    coef = _rows2d(coef)
    x, pred = _rows2d(x), _rows2d(pred)
    out = torch.empty_like(x)
    x0 = torch.empty_like(x)
    u = _rows2d(pred_uncond) if pred_uncond is not None else pred
    p = _rows2d(prev) if prev is not None else x
    mode = 1 if noise is not None else (2 if seed is not None else 0)
    z = _rows2d(noise) if noise is not None else x
    s = seed if seed is not None else coef
    lo = float("-inf") if clamp_min is None else float(clamp_min)
    hi = float("inf") if clamp_max is None else float(clamp_max)
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    bd = max(16, min(triton.next_power_of_2(D), 2048 if interp else 256))
    bm = max(1, min(triton.next_power_of_2(M), (65536 if interp else 4096) // bd))
    grid = (triton.cdiv(M, bm), triton.cdiv(D, bd))
    _sampler_step_kernel[grid](x, pred, u, p, coef, z, s, out, x0, M, D,
                               x.stride(0), pred.stride(0), u.stride(0), p.stride(0), coef.stride(0), z.stride(0),
                               out.stride(0), x0.stride(0), float(guidance), lo, hi, int(offset) * NOISE_KEY_STRIDE,
                               HAS_UNCOND=pred_uncond is not None, HAS_PREV=prev is not None, NOISE=mode,
                               CLAMP=clamp_min is not None or clamp_max is not None, BLOCK_M=bm, BLOCK_D=bd,
                               num_warps=4)
    return out, x0
