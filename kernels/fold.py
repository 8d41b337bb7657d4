"""LayerNorm folded into the linear layer after it: plain torch, no Triton.

The shared-modulation block kernel (:mod:`.modulated_block`) and :mod:`scidiff.ops` (the
engine's folded network on every device) both use it; it lives here so that the kernels need
nothing from ``scidiff``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def fold_layer_norm(weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fold a modulated LayerNorm into the linear layer after it, for rows ``s`` of ``shift``,
    ``scale [S, K]`` that all cells share (one per timestep of a sampling plan, say):

        W (LN(h) (1 + scale_s) + shift_s) + b = rstd(h) (h W'_s - mean(h) u_s) + v_s

    with ``W'_s = (W diag(1 + scale_s))^T [K, N]`` (in ``weight``'s dtype), ``u_s = 1^T W'_s`` (of
    the rounded ``W'_s``, so the mean cancels exactly) and ``v_s = W shift_s + b`` (fp32, or
    float64 for a float64 weight). The
    layer becomes one GEMM over ``h`` (``folded_linear``)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(acc)
    weight_t = (w.t()[None] * (1.0 + scale.to(acc))[:, :, None]).to(weight.dtype)
    u = weight_t.to(acc).sum(1)
    v = torch.addmm(bias.to(acc)[None], shift.to(acc), w.t())
    return weight_t, u, v
