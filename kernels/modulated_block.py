"""The fused adaLN-modulated residual MLP block (Triton).

    out = h + gate * SiLU(W (LayerNorm(h) * (1 + scale) + shift) + b)

Forward: one kernel. Each program owns a ``BLOCK_M x BLOCK_N`` tile of the output: it computes
its rows' LayerNorm statistics, then streams ``h`` and the modulation along K, normalising and
modulating each tile in registers just before the tensor-core dot, so the normalised activation
never goes to memory; bias, SiLU, gate and the residual add are the epilogue.

Shared modulation (one ``shift``/``scale``/``gate`` row for all cells, the sampling engine's
case): LayerNorm is folded into the weight, ``W (LN(h)(1 + scale) + shift) + b =
rstd (h W'^T - mean u) + v`` with ``W' = W diag(1 + scale)``, ``u = W' 1`` and ``v = W shift + b``
(``fold.py``), so the block is a plain tiled GEMM over ``h``
(``folded_linear``, tiles autotuned per shape) that applies the row statistics in its epilogue
and, where one tile spans the row, writes the next layer's (``row_stats``, their own kernel,
gives the first layer's). The same kernel without the residual epilogue is the
network's final modulated LayerNorm + output layer.

Backward (``modulated_block_backward``): the same kernel run with ``BACKWARD=True`` recomputes the
pre-activation and writes ``dy = g * gate * SiLU'(y)``, ``dgate = g * SiLU(y)``, the modulated
input ``z`` and the row statistics; two GEMMs (``dW = dy^T z``, ``dz = dy W``) go to cuBLAS; a
row kernel finishes the LayerNorm backward (``dh``, ``dscale``). Recomputing ``y`` costs one GEMM
but keeps nothing but the inputs alive between forward and backward.

Accumulation is fp32. The dot runs in the weight's dtype (fp32 as IEEE fp32, not TF32); under the
Triton interpreter bf16 operands are widened to fp32 first, because the interpreter's bf16 dot is
wrong. The pure-torch reference with the same signature is
``scidiff.ops.modulated_block.modulated_block_reference``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fold import fold_layer_norm


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _row_stats(h_ptr, rows, rmask, stride_h, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/std over K of ``BLOCK_M`` rows (two passes, fp32)."""
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        acc += tl.sum(tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32), 1)
    mean = acc / K
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        d = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None]
        d = tl.where(m, d, 0.0)
        acc += tl.sum(d * d, 1)
    rstd = 1.0 / tl.sqrt(acc / K + eps)
    return mean, rstd


@triton.jit
def _block_kernel(h_ptr, shift_ptr, scale_ptr, gate_ptr, w_ptr, b_ptr, out_ptr,
                  g_ptr, z_ptr, dy_ptr, dgate_ptr, mean_ptr, rstd_ptr,
                  M, N, K,
                  stride_h, stride_shift, stride_scale, stride_gate, stride_w, stride_out,
                  stride_g, stride_z, stride_dy, stride_dgate,
                  eps,
                  BACKWARD: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    mean, rstd = _row_stats(h_ptr, rows, rmask, stride_h, K, eps, BLOCK_M, BLOCK_K)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        m = rmask[:, None] & kmask[None, :]
        hv = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + rows[:, None] * stride_scale + ks[None, :], mask=m, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + rows[:, None] * stride_shift + ks[None, :], mask=m, other=0.0).to(tl.float32)
        z = (hv - mean[:, None]) * rstd[:, None] * (1.0 + sc) + sh
        z = tl.where(m, z, 0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        zc = z.to(w.dtype)
        if BACKWARD:
            if pid_n == 0:
                tl.store(z_ptr + rows[:, None] * stride_z + ks[None, :], zc.to(z_ptr.dtype.element_ty), mask=m)
        if DOT_FP32:
            acc += tl.dot(zc.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(zc, w, input_precision=PRECISION)

    om = rmask[:, None] & cmask[None, :]
    y = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sig = tl.sigmoid(y)
    act = y * sig
    gate = tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=om, other=0.0).to(tl.float32)
    res = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], (res + gate * act).to(out_ptr.dtype.element_ty),
             mask=om)
    if BACKWARD:
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=om, other=0.0).to(tl.float32)
        dy = g * gate * sig * (1.0 + y * (1.0 - sig))
        tl.store(dy_ptr + rows[:, None] * stride_dy + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=om)
        tl.store(dgate_ptr + rows[:, None] * stride_dgate + cols[None, :], (g * act).to(dgate_ptr.dtype.element_ty),
                 mask=om)
        if pid_n == 0:
            tl.store(mean_ptr + rows, mean, mask=rmask)
            tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _tile_stats(x, cmask, K, eps):
    """Mean and 1/std over the columns of a register tile ``x [BLOCK_M, BLOCK_K]`` holding whole
    rows (``cmask``: the real columns), two passes in registers."""
    x = tl.where(cmask[None, :], x, 0.0)
    mean = tl.sum(x, 1) / K
    d = tl.where(cmask[None, :], x - mean[:, None], 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(d * d, 1) / K + eps)


@triton.jit
def _row_stats_kernel(h_ptr, mean_ptr, rstd_ptr, M, K, stride_h, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """LayerNorm's mean and 1/std of each row of ``h`` (two passes, fp32)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    if BLOCK_K >= K:  # the whole row in registers: one read
        ks = tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        mean, rstd = _tile_stats(tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0)
                                 .to(tl.float32), ks < K, K, eps)
    else:
        mean, rstd = _row_stats(h_ptr, rows, rmask, stride_h, K, eps, BLOCK_M, BLOCK_K)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _folded_kernel(h_ptr, mean_ptr, rstd_ptr, w_ptr, u_ptr, v_ptr, gate_ptr, out_ptr, out_mean_ptr, out_rstd_ptr,
                   M, N, K, stride_h, stride_wk, stride_wn, stride_out, eps,
                   RESIDUAL: tl.constexpr, STATS_OUT: tl.constexpr, DOT_FP32: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y = rstd (h W' - mean u) + v``, a LayerNorm-modulated linear layer folded into a plain
    tiled GEMM (``W' [K, N]``, row statistics given); with ``RESIDUAL`` the block's epilogue
    ``out = h + gate * SiLU(y)``; with ``STATS_OUT`` (one tile spans all ``N`` columns) also the
    next LayerNorm's statistics of the rows written."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        hv = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        hc = hv.to(w.dtype)
        if DOT_FP32:
            acc += tl.dot(hc.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(hc, w, input_precision=PRECISION)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    v = tl.load(v_ptr + cols, mask=cmask, other=0.0)
    y = rstd[:, None] * (acc - mean[:, None] * u[None, :]) + v[None, :]
    om = rmask[:, None] & cmask[None, :]
    if RESIDUAL:
        gate = tl.load(gate_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        res = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=om, other=0.0).to(tl.float32)
        y = res + gate[None, :] * (y * tl.sigmoid(y))
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y, mask=om)
    if STATS_OUT:  # of the rounded values the next layer reads
        out_mean, out_rstd = _tile_stats(y.to(tl.float32), cmask, N, eps)
        tl.store(out_mean_ptr + rows, out_mean, mask=rmask)
        tl.store(out_rstd_ptr + rows, out_rstd, mask=rmask)


# GEMM tiles of the folded kernel on a GPU, chosen per (M, N, K, dtype) by timing. Row statistics
# come from their own kernel: reducing the ``h`` tiles inside the pipelined K loop, next to the
# tensor-core dot, gave wrong rows for some tiles on an H200 (Triton 3.6), see bench/results/gpu.
FOLDED_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                  for bm, bn, bk, w, st in [(128, 256, 64, 8, 3), (128, 256, 32, 8, 4), (64, 512, 32, 8, 3),
                                            (128, 128, 64, 8, 3), (64, 256, 128, 8, 2), (128, 64, 64, 4, 3),
                                            (64, 64, 64, 4, 3)]]
_folded_tuned = triton.autotune(configs=FOLDED_CONFIGS, key=["M", "N", "K", "RESIDUAL", "DOT_FP32", "PRECISION"])(
    _folded_kernel)
# with the output's row statistics, one tile must span the row: N <= 512 (wider rows take the
# separate statistics kernel); 64 x 512 x 32 ran within 2% of the best autotuned tile on an H200
STATS_OUT_MAX_N = 512


@triton.jit
def _layer_norm_backward_kernel(h_ptr, scale_ptr, dz_ptr, g_ptr, mean_ptr, rstd_ptr, dh_ptr, dscale_ptr,
                                M, K, stride_h, stride_scale, stride_dz, stride_g, stride_dh, stride_dscale,
                                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh = g + rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))`` with ``dxhat = dz (1 + scale)``,
    and ``dscale = dz xhat`` (``g``: the gradient reaching ``h`` through the residual path)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        xhat = (tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32)
                - mean[:, None]) * rstd[:, None]
        dz = tl.load(dz_ptr + rows[:, None] * stride_dz + ks[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + rows[:, None] * stride_scale + ks[None, :], mask=m, other=0.0).to(tl.float32)
        dxhat = tl.where(m, dz * (1.0 + sc), 0.0)
        s1 += tl.sum(dxhat, 1)
        s2 += tl.sum(tl.where(m, dxhat * xhat, 0.0), 1)
    c1 = s1 / K
    c2 = s2 / K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        xhat = (tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32)
                - mean[:, None]) * rstd[:, None]
        dz = tl.load(dz_ptr + rows[:, None] * stride_dz + ks[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + rows[:, None] * stride_scale + ks[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * stride_g + ks[None, :], mask=m, other=0.0).to(tl.float32)
        dh = g + rstd[:, None] * (dz * (1.0 + sc) - c1[:, None] - xhat * c2[:, None])
        tl.store(dh_ptr + rows[:, None] * stride_dh + ks[None, :], dh.to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dscale_ptr + rows[:, None] * stride_dscale + ks[None, :], (dz * xhat).to(dscale_ptr.dtype.element_ty),
                 mask=m)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _blocks(M: int, N: int, K: int):
    """Tile sizes and warps: 64 x 64 x 64 on a GPU (4 warps, 3 pipeline stages); as large as
    allowed under the interpreter, where every program instance costs milliseconds."""
    if _interpreting():
        return _pow2(M, 16, 64), _pow2(N, 16, 128), _pow2(K, 16, 128), 4
    return _pow2(M, 16, 64), _pow2(N, 16, 64), _pow2(K, 16, 64), 4


STAGES = 3  # software pipelining of the K loop on a GPU (ignored by the interpreter)


def _rows(t: torch.Tensor, M: int, K: int) -> torch.Tensor:
    """``t`` broadcast to ``[M, K]`` with unit column stride (row stride 0 where broadcast)."""
    t = t.reshape(-1, K) if t.dim() != 1 else t.reshape(1, K)
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.shape[0] == 1 and M != 1:
        return t.expand(M, K)
    if t.shape[0] != M:
        raise ValueError(f"modulation has {t.shape[0]} rows, expected {M} or 1")
    return t


def _check(h, weight, bias):
    K = h.shape[-1]
    N, Kw = weight.shape
    if Kw != K or N != K:
        raise ValueError(f"the residual block needs a square weight [{K}, {K}], got {list(weight.shape)}")
    if bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {list(bias.shape)}")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {h.dtype}")
    return N, K


def _dot_mode(weight: torch.Tensor) -> tuple[bool, str]:
    """``(DOT_FP32, PRECISION)`` for a dot in ``weight``'s dtype: bf16 widened to fp32 under the
    interpreter (whose bf16 dot is wrong); fp32 as IEEE fp32, not TF32."""
    return (weight.dtype == torch.bfloat16 and _interpreting(),
            "ieee" if weight.dtype == torch.float32 else "tf32")


def row_stats(h2: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm's ``(mean, 1/std)`` of each row of ``h2 [M, K]`` (fp32 ``[M]`` each)."""
    M, K = h2.shape
    mean = torch.empty(M, device=h2.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    BK = _pow2(K, 16, 1024)
    BM = 16 if _interpreting() else max(1, 8192 // BK)
    _row_stats_kernel[(triton.cdiv(M, BM),)](h2, mean, rstd, M, K, h2.stride(0), float(eps),
                                             BLOCK_M=BM, BLOCK_K=BK, num_warps=8)
    return mean, rstd


def _fills_the_device(device: torch.device, M: int) -> bool:
    """Whether the 64-row tiles of the statistics-writing launch are at least one per SM. Below
    that (about 8k rows on an H100) the autotuned smaller tiles and the separate statistics
    kernel win: 172k vs 107k cells/s at batch 1,024 in the engine (bench/results/gpu)."""
    if _interpreting() or device.type != "cuda":
        return True
    return triton.cdiv(M, 64) >= torch.cuda.get_device_properties(device).multi_processor_count


def folded_linear(h2: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight_t: torch.Tensor, u: torch.Tensor,
                  v: torch.Tensor, gate: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                  stats_out: bool = False, eps: float = 1e-6, config: dict | None = None):
    """``rstd (h2 W' - mean u) + v`` for ``h2 [M, K]`` and a folded weight ``weight_t [K, N]``
    (see ``scidiff.ops.fold_layer_norm``); with ``gate [N]`` (``N = K``) the residual block
    ``h2 + gate * SiLU(...)``. ``stats_out``: return ``(out, mean, rstd)`` with the output rows'
    LayerNorm statistics, from the GEMM's epilogue where ``N <= 512``, the rows fill the
    device and one tile spans the row. ``config``: fixed tiles
    (``BLOCK_M/N/K``, ``num_warps``, ``num_stages``) instead of the autotuned ones."""
    M, K = h2.shape
    N = weight_t.shape[1]
    if weight_t.shape[0] != K:
        raise ValueError(f"folded weight is {list(weight_t.shape)}, expected [{K}, N]")
    if gate is not None and N != K:
        raise ValueError(f"the residual block needs N = K, got [{K}, {N}]")
    out = torch.empty((M, N), device=h2.device, dtype=out_dtype or h2.dtype)
    # the epilogue's statistics are right only where one tile spans the row: a given ``config``
    # with a narrower BLOCK_N takes the separate statistics kernel
    fused_stats = (stats_out and N <= STATS_OUT_MAX_N and _fills_the_device(h2.device, M)
                   and (config is None or int(config["BLOCK_N"]) >= N))
    out_mean = torch.empty(M, device=h2.device, dtype=torch.float32) if fused_stats else u
    out_rstd = torch.empty_like(out_mean) if fused_stats else u
    dot_fp32, precision = _dot_mode(weight_t)
    args = (h2, mean, rstd, weight_t, u, v, u if gate is None else gate, out, out_mean, out_rstd, M, N, K,
            h2.stride(0), weight_t.stride(0), weight_t.stride(1), out.stride(0), float(eps))
    flags = dict(RESIDUAL=gate is not None, STATS_OUT=fused_stats, DOT_FP32=dot_fp32, PRECISION=precision)
    if fused_stats and config is None:
        BN = _pow2(N, 16, STATS_OUT_MAX_N)
        config = ({"BLOCK_M": 16, "BLOCK_N": BN, "BLOCK_K": _pow2(K, 16, 64), "num_warps": 4} if _interpreting()
                  else {"BLOCK_M": 64, "BLOCK_N": BN, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3})
    if _interpreting() or config is not None:
        BM, BN, BK, warps = _blocks(M, N, K)
        c = config or {"BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK, "num_warps": warps}
        _folded_kernel[(triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))](*args, **flags, **c)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _folded_tuned[grid](*args, **flags)
    if not stats_out:
        return out
    return (out, out_mean, out_rstd) if fused_stats else (out, *row_stats(out, eps))


def _launch_shared(h2, shift, scale, gate, weight, bias, eps):
    """The block with one modulation row: LayerNorm's affine part and the modulation folded into
    the weight (:func:`.fold.fold_layer_norm`), the row statistics, then the folded GEMM."""
    K = h2.shape[1]
    weight_t, u, v = fold_layer_norm(weight, bias, shift.reshape(1, K), scale.reshape(1, K))
    mean, rstd = row_stats(h2, eps)
    return folded_linear(h2, mean, rstd, weight_t[0], u[0], v[0], gate.reshape(-1).contiguous())


def _launch(h, shift, scale, gate, weight, bias, eps, grad_out=None):
    N, K = _check(h, weight, bias)
    h2 = h.reshape(-1, K)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    M = h2.shape[0]
    if grad_out is None and all(t.numel() == K for t in (shift, scale, gate)):
        return _launch_shared(h2, shift, scale, gate, weight, bias, eps).reshape(h.shape[:-1] + (N,))
    shift2, scale2, gate2 = _rows(shift, M, K), _rows(scale, M, K), _rows(gate, M, K)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.empty((M, N), device=h.device, dtype=h.dtype)
    backward = grad_out is not None
    if backward:
        g = grad_out.reshape(-1, N)
        g = g if g.stride(-1) == 1 else g.contiguous()
        z = torch.empty((M, K), device=h.device, dtype=weight.dtype)
        dy = torch.empty((M, N), device=h.device, dtype=weight.dtype)
        dgate = torch.empty((M, N), device=h.device, dtype=torch.float32)
        mean = torch.empty(M, device=h.device, dtype=torch.float32)
        rstd = torch.empty(M, device=h.device, dtype=torch.float32)
    else:
        g = z = dy = dgate = out
        mean = rstd = out
    BM, BN, BK, warps = _blocks(M, N, K)
    dot_fp32, precision = _dot_mode(weight)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _block_kernel[grid](h2, shift2, scale2, gate2, weight, bias, out, g, z, dy, dgate, mean, rstd,
                        M, N, K,
                        h2.stride(0), shift2.stride(0), scale2.stride(0), gate2.stride(0), weight.stride(0),
                        out.stride(0), g.stride(0), z.stride(0), dy.stride(0), dgate.stride(0),
                        float(eps),
                        BACKWARD=backward, DOT_FP32=dot_fp32, PRECISION=precision,
                        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=STAGES)
    if not backward:
        return out.reshape(h.shape[:-1] + (N,))
    return out, g, z, dy, dgate, mean, rstd, (h2, shift2, scale2, gate2, M, N, K)


def modulated_block(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``h + gate * SiLU(Linear(LayerNorm(h) * (1 + scale) + shift))`` in one kernel. ``h``:
    ``[..., H]``; ``shift``, ``scale``, ``gate``: ``[..., H]`` or ``[1, H]`` (one row for all);
    ``weight``: ``[H, H]``; output in ``h``'s dtype."""
    return _launch(h, shift, scale, gate, weight, bias, eps)


def _reduce_like(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a ``[M, H]`` gradient over the rows a broadcast input did not have."""
    if grad.shape[0] != 1 and (like.dim() == 1 or like.reshape(-1, like.shape[-1]).shape[0] == 1):
        grad = grad.sum(0, keepdim=True)
    return grad.reshape(like.shape).to(like.dtype)


def modulated_block_backward(grad_out: torch.Tensor, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                             gate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6):
    """Gradients ``(dh, dshift, dscale, dgate, dweight, dbias)`` of :func:`modulated_block`,
    each shaped and typed like its input."""
    _, g, z, dy, dgate, mean, rstd, (h2, shift2, scale2, gate2, M, N, K) = _launch(
        h, shift, scale, gate, weight, bias, eps, grad_out)
    dweight = dy.t().mm(z)
    dbias = dy.sum(0, dtype=torch.float32)
    dz = dy.mm(weight)
    dh = torch.empty((M, K), device=h.device, dtype=h.dtype)
    dscale = torch.empty((M, K), device=h.device, dtype=torch.float32)
    BM, _, BK, warps = _blocks(M, N, K)
    _layer_norm_backward_kernel[(triton.cdiv(M, BM),)](
        h2, scale2, dz, g, mean, rstd, dh, dscale, M, K,
        h2.stride(0), scale2.stride(0), dz.stride(0), g.stride(0), dh.stride(0), dscale.stride(0),
        BLOCK_M=BM, BLOCK_K=BK, num_warps=warps)
    return (dh.reshape(h.shape), _reduce_like(dz, shift), _reduce_like(dscale, scale), _reduce_like(dgate, gate),
            dweight.to(weight.dtype), dbias.to(bias.dtype))
