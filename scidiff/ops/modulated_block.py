"""The timestep-modulated residual MLP block: the pure-torch reference, the ``scidiff::`` custom
ops around the Triton kernel (``kernels/modulated_block.py``), and the dispatching call.

The custom ops (``torch.library.custom_op`` + ``register_fake``) let ``torch.compile(fullgraph=True)``
trace a model with the kernel inside as one opaque node; ``register_autograd`` gives it the
kernel's own backward, so training runs fused too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import load_kernel, use_triton


def modulated_block_reference(h: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, weight: Tensor, bias: Tensor,
                              eps: float = 1e-6) -> Tensor:
    """``h + gate * SiLU(Linear(LayerNorm(h) * (1 + scale) + shift))``: one adaLN-Zero residual
    block (Peebles & Xie 2023) in plain torch. ``shift``, ``scale``, ``gate`` broadcast against
    ``h [B, H]`` (``[B, H]`` or ``[1, H]``). ``addcmul`` fuses each multiply-add pair (about 15%
    faster on CPU than separate ops; the same arithmetic)."""
    z = torch.addcmul(shift, F.layer_norm(h, h.shape[-1:], eps=eps), 1 + scale)
    return torch.addcmul(h, gate, F.silu(F.linear(z, weight, bias)))


@torch.library.custom_op("scidiff::modulated_block", mutates_args=())
def _block_op(h: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, weight: Tensor, bias: Tensor,
              eps: float) -> Tensor:
    return load_kernel("modulated_block").modulated_block(h, shift, scale, gate, weight, bias, eps)


@_block_op.register_fake
def _block_fake(h, shift, scale, gate, weight, bias, eps):
    return h.new_empty(h.shape[:-1] + (weight.shape[0],))


@torch.library.custom_op("scidiff::modulated_block_backward", mutates_args=())
def _block_backward_op(grad: Tensor, h: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, weight: Tensor,
                       bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return load_kernel("modulated_block").modulated_block_backward(grad, h, shift, scale, gate, weight, bias, eps)


@_block_backward_op.register_fake
def _block_backward_fake(grad, h, shift, scale, gate, weight, bias, eps):
    return tuple(torch.empty_like(t) for t in (h, shift, scale, gate, weight, bias))


def _setup_context(ctx, inputs, output):
    h, shift, scale, gate, weight, bias, eps = inputs
    ctx.save_for_backward(h, shift, scale, gate, weight, bias)
    ctx.eps = eps


def _backward(ctx, grad):
    return (*torch.ops.scidiff.modulated_block_backward(grad.contiguous(), *ctx.saved_tensors, ctx.eps), None)


_block_op.register_autograd(_backward, setup_context=_setup_context)


def modulated_block(h: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, weight: Tensor, bias: Tensor,
                    eps: float = 1e-6) -> Tensor:
    """The block through the fused Triton kernel where it runs (see :mod:`scidiff.ops.dispatch`),
    else the reference. Under autocast the weight is cast to the autocast dtype first, as
    ``F.linear`` would."""
    if use_triton(h):
        device = h.device.type
        if torch.is_autocast_enabled(device):
            weight = weight.to(torch.get_autocast_dtype(device))
        return torch.ops.scidiff.modulated_block(h, shift, scale, gate, weight, bias, eps)
    return modulated_block_reference(h, shift, scale, gate, weight, bias, eps)


# -- shared modulation: LayerNorm folded into the weight ---------------------------------------------
def fold_layer_norm(weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fold a modulated LayerNorm into the linear layer after it, for modulation rows that all
    cells share (``kernels/fold.py``, plain torch: the shared-modulation kernel uses it too)."""
    return load_kernel("fold").fold_layer_norm(weight, bias, shift, scale)


def row_stats_reference(h: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """LayerNorm's ``(mean, 1/std)`` of each row of ``h [M, K]`` (fp32 ``[M]``)."""
    var, mean = torch.var_mean(h.to(torch.promote_types(h.dtype, torch.float32)), dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


def folded_linear_reference(h: Tensor, mean: Tensor, rstd: Tensor, weight_t: Tensor, u: Tensor, v: Tensor,
                            gate: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """``y = rstd (h W' - mean u) + v`` (see :func:`fold_layer_norm`); with ``gate`` the residual
    block ``h + gate * SiLU(y)``. fp32 arithmetic (float64 for float64 inputs), output in
    ``out_dtype`` (default ``h``'s)."""
    acc = torch.promote_types(u.dtype, torch.float32)
    y = rstd[:, None] * (h.to(weight_t.dtype).to(acc) @ weight_t.to(acc) - mean[:, None] * u) + v
    if gate is not None:
        y = h.to(acc) + gate.to(acc) * F.silu(y)
    return y.to(out_dtype or h.dtype)


@torch.library.custom_op("scidiff::row_stats", mutates_args=())
def _row_stats_op(h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return load_kernel("modulated_block").row_stats(h, eps)


@_row_stats_op.register_fake
def _row_stats_fake(h, eps):
    return h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.float32)


@torch.library.custom_op("scidiff::folded_linear", mutates_args=())
def _folded_op(h: Tensor, mean: Tensor, rstd: Tensor, weight_t: Tensor, u: Tensor, v: Tensor, gate: Tensor | None,
               out_dtype: torch.dtype | None) -> Tensor:
    return load_kernel("modulated_block").folded_linear(h, mean, rstd, weight_t, u, v, gate, out_dtype)


@_folded_op.register_fake
def _folded_fake(h, mean, rstd, weight_t, u, v, gate, out_dtype):
    return h.new_empty(h.shape[0], weight_t.shape[1], dtype=out_dtype or h.dtype)


@torch.library.custom_op("scidiff::folded_linear_with_stats", mutates_args=())
def _folded_stats_op(h: Tensor, mean: Tensor, rstd: Tensor, weight_t: Tensor, u: Tensor, v: Tensor,
                     gate: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return load_kernel("modulated_block").folded_linear(h, mean, rstd, weight_t, u, v, gate, stats_out=True)


@_folded_stats_op.register_fake
def _folded_stats_fake(h, mean, rstd, weight_t, u, v, gate):
    rows = h.new_empty(h.shape[0], dtype=torch.float32)
    return h.new_empty(h.shape[0], weight_t.shape[1]), rows, torch.empty_like(rows)


def row_stats(h: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """:func:`row_stats_reference` through its Triton kernel (``torch.ops.scidiff.row_stats``)
    where it runs."""
    if use_triton(h):
        return torch.ops.scidiff.row_stats(h if h.stride(-1) == 1 else h.contiguous(), eps)
    return row_stats_reference(h, eps)


def folded_linear(h: Tensor, mean: Tensor, rstd: Tensor, weight_t: Tensor, u: Tensor, v: Tensor,
                  gate: Tensor | None = None, out_dtype: torch.dtype | None = None, stats_out: bool = False):
    """:func:`folded_linear_reference` as one GEMM kernel (statistics and epilogue fused) where
    Triton runs (``torch.ops.scidiff.folded_linear``). ``stats_out``: return ``(out, mean,
    rstd)``, the output rows' LayerNorm statistics as well (from the kernel's epilogue where it
    can, ``torch.ops.scidiff.folded_linear_with_stats``; output in ``h``'s dtype), for the next
    layer."""
    if use_triton(h):
        h = h if h.stride(-1) == 1 else h.contiguous()
        if stats_out:
            return torch.ops.scidiff.folded_linear_with_stats(h, mean, rstd, weight_t, u, v, gate)
        return torch.ops.scidiff.folded_linear(h, mean, rstd, weight_t, u, v, gate, out_dtype)
    out = folded_linear_reference(h, mean, rstd, weight_t, u, v, gate, None if stats_out else out_dtype)
    return (out, *row_stats_reference(out)) if stats_out else out
